"""Graduate admissions regression (paper Fig. 1): the problem and its data file."""
