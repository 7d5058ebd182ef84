"""Stage one: run a teacher ensemble over a transfer set once and write its logits to a target store.

- :mod:`.engine`: the driver, :func:`precompute`.
- :mod:`.options`: what a run is asked to do in every process (:class:`RunOptions`, the job, the device).
- :mod:`.runner`: the compute loop and the writer thread (:class:`ShardRunner`), and the dask task.
- :mod:`.teachers`: loading teachers (modules, import paths, TorchScript, checkpoints) and their fingerprints.
- :mod:`.transfer`: the transfer set (datasets, tensors, WebDataset shards), its keys and batches.
- :mod:`.cluster`: the fan-out of shard tasks on dask.distributed.
- :mod:`.shipped`: jobs pickled with their tensors out of band.

After ``import softtargets``, the attribute ``softtargets.precompute`` is the function
(:func:`softtargets.precompute`); this package stays importable by name (``import softtargets.precompute.engine``,
``from softtargets.precompute import engine``).
"""

from __future__ import annotations

from .engine import precompute
from .options import AUTOCAST, NONFINITE, NonFiniteError, PrecomputeJob, RunOptions, load_transfer_set, resolve_device
from .runner import ShardRunner

__all__ = [
    "AUTOCAST",
    "NONFINITE",
    "NonFiniteError",
    "PrecomputeJob",
    "RunOptions",
    "ShardRunner",
    "load_transfer_set",
    "precompute",
    "resolve_device",
]
