"""Observation: the bottleneck verdict and periodic stats reports."""
