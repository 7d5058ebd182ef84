"""The pure math: tempered softmax and ensemble rules (:mod:`.temperature`), distillation losses (:mod:`.losses`).

Imports only torch and numpy; every other layer may import it.
"""
