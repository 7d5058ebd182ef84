"""Hinton, Vinyals & Dean (2015) §3 on scikit-learn digits through softtargets' stores.

Run it with ``python -m pipelines.digits`` (see ``__main__.py`` and ``README.md``).
"""
