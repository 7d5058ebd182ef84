"""``python -m pipelines.textlm``: language-model distillation on the running Python's standard library, through
softtargets' sequence stores (see ``pipelines/textlm/README.md``)."""
