"""Generalist + specialists and FitNets hints on digits: ``python -m pipelines.specialists``."""
