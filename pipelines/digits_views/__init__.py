"""Augmentation-aware targets on scikit-learn digits: stored views replayed against clean targets and online
distillation (``python -m pipelines.digits_views``; see README.md)."""
