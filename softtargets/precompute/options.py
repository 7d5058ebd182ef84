"""What a stage-one run is asked to do, in every process: its options, its job, its transfer set, its device.

Non-finite teacher logits (``nonfinite``): ``"error"`` (default) stops the run with
:class:`NonFiniteError` naming the teacher and the sample keys. ``"uniform"`` replaces the
offending teacher's row with zeros (a uniform distribution for that teacher: the ensemble
rules then average it in as such) and lists ``{key: [teacher, ...]}`` in the manifest's
``extra["nonfinite"]``. Rows cannot be skipped: a store holds every transfer-set sample.

"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..choices import Autocast, NonFinite, choices, parse_choice
from ..errors import NonFiniteError as NonFiniteError  # its old import path
from ..importing import import_object
from ..store.base import MARKER_DIR
from ..text import plural
from .shipped import Shipped
from .teachers import TeacherSpec
from .transfer import TransferSet, as_transfer_set

AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE = choices(NonFinite)
SETTINGS_FILE = f"{MARKER_DIR}/precompute-settings"  # run settings, for the resume check
NONFINITE_SUFFIX = ".nonfinite"  # per-shard {key: [teachers]} beside the shard markers
INPUT_MEMBER = "input.npy"


# ---------------------------------------------------------------------------------------------------
# Settings shared by the driver and every shard task


@dataclass(frozen=True)
class RunOptions:
    """How shards are computed (the same in every process).

    Attributes:
        batch_size: rows per forward pass; each shard's batches start at its first row.
        num_workers: ``DataLoader`` worker processes per shard runner (0 = load in the runner).
        device: ``"auto"`` (CUDA when present: in a dask worker, GPU ``worker name % GPUs``;
            else CPU), or a torch device string.
        autocast: ``None``, ``"bf16"`` or ``"fp16"``. fp16 needs CUDA (refused on CPU); bf16
            also runs on CPU. Outputs are cast to float32 before the ensemble rule.
        nonfinite: ``"error"`` or ``"uniform"`` (see the module docstring).
        pack_inputs: also write each sample's input as ``input.npy`` (wds ``sample`` layout).
        queue_size: batches in flight between the compute loop and the writer thread, handed over
            in groups of up to ``queue_size // 2``.
    """

    batch_size: int = 256
    num_workers: int = 2
    device: str = "auto"
    autocast: Autocast | None = None
    nonfinite: NonFinite = "error"
    pack_inputs: bool = False
    queue_size: int = 8

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        parse_choice("autocast", self.autocast, Autocast | None)
        parse_choice("nonfinite policy", self.nonfinite, NonFinite)
        if int(self.queue_size) < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")

    def settings(self) -> dict[str, Any]:
        """What changes the stored bits; recorded in the manifest and checked on resume."""
        return {"batch_size": int(self.batch_size), "autocast": self.autocast, "nonfinite": self.nonfinite}


@dataclass
class PrecomputeJob:
    """Everything a process needs to compute shards of one store; small and picklable.

    ``teachers`` are specs (``nn.Module`` objects or config mappings, see
    :mod:`softtargets.precompute.teachers`) with the driver's ``fingerprints``: a process that loads a
    teacher with other weights (a factory without fixed weights or seed) is refused.
    ``dataset`` is a :class:`TransferSet` or a spec mapping for :func:`load_transfer_set`.
    """

    url: str
    teachers: list[TeacherSpec]
    fingerprints: list[str]
    dataset: Any
    num_samples: int
    dataset_fingerprint: str
    options: RunOptions
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # may hold credentials: not shown
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with the tensors of its teachers and transfer set out of band
        (:mod:`softtargets.precompute.shipped`): dask sends them to its workers without copying them through
        the pickle stream."""
        return _job, (Shipped(dict(vars(self))),)


def _job(fields: dict[str, Any]) -> PrecomputeJob:
    return PrecomputeJob(**fields)


# ---------------------------------------------------------------------------------------------------
# Transfer sets from config


def load_transfer_set(spec: Any) -> TransferSet:
    """A :class:`TransferSet` from a dataset object, WebDataset URL(s), or a config mapping.

    Mappings: ``{"factory": "pkg.mod:fn", "kwargs": {...}, "name": ...}`` (``fn(**kwargs)``
    returns a map-style dataset) or ``{"webdataset": "shards-{000..009}.tar", "name": ...}``.
    """
    if not isinstance(spec, Mapping):
        return as_transfer_set(spec)
    allowed = {"factory", "kwargs", "webdataset", "name"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"transfer_set: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if ("factory" in spec) == ("webdataset" in spec):
        raise ValueError("transfer_set: give exactly one of 'factory' and 'webdataset'")
    name = spec.get("name")
    if "webdataset" in spec:
        return as_transfer_set(spec["webdataset"], name=name)
    kwargs = spec.get("kwargs") or {}
    dataset = import_object(spec["factory"], "transfer_set factory")(**kwargs)
    return as_transfer_set(dataset, name=name or str(spec["factory"]).rpartition(":")[2])


# ---------------------------------------------------------------------------------------------------
# Devices


def _worker_ordinal() -> int:
    """This dask worker's name as an int (LocalCluster names workers 0..n-1); 0 elsewhere."""
    try:
        from distributed import get_worker

        return int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return 0


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when present (GPU ``worker ordinal % count`` in a dask worker), else CPU.

    Raises:
        ValueError: a CUDA device is asked for where torch sees none, or one beyond the GPUs there are.
    """
    if device != "auto":
        chosen = torch.device(device)
        if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
            why = "torch here was built without CUDA" if torch.version.cuda is None else \
                f"{plural(torch.cuda.device_count(), 'GPU')} visible"
            raise ValueError(f"device {device!r} is not available ({why}); use device = \"auto\" or \"cpu\"")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", _worker_ordinal() % torch.cuda.device_count())
    return torch.device("cpu")


def check_autocast(device: torch.device, autocast: str | None) -> None:
    """Refuse fp16 autocast off CUDA (CPU fp16 matmuls are slow and rarely what anyone wants)."""
    if autocast == "fp16" and device.type != "cuda":
        raise ValueError(f"autocast='fp16' needs a CUDA device, this runs on {device}; use autocast='bf16' "
                         "(supported on CPU) or none")
