"""Hinton, Vinyals & Dean (2015) §3 on scikit-learn digits, run through softtargets' stores: ``python -m pipelines.digits``."""
