"""Burgers PINN problems (paper Figs. 2 and 3): the problems, their exact solutions
(``exact``) and the PINN network with its input derivatives (``pinn``)."""
