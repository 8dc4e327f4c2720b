"""Mean estimation (``experiment=mean_estimation``): the smallest stochastic problem with
closed-form SGD iterates, for checking methods against formulas (backward SGD, EXTRAP-SGD)."""
