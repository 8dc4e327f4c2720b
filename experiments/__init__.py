"""Reproduction harness for "Stable Anderson Acceleration for Deep Learning"."""
