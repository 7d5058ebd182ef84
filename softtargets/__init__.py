"""softtargets: offline soft targets for knowledge distillation.

Stage one runs a teacher ensemble once and writes its logits into a target store
(Zarr or WebDataset, described by one manifest); stage two streams the store into
training, where the student's loss applies any temperature and ensemble rule.
"""

__version__ = "0.1.0"

from .manifest import FORMAT_VERSION, Manifest, ManifestError  # noqa: E402
from .store import (  # noqa: E402
    ChecksumError,
    StoreError,
    TargetStore,
    TargetWriter,
    attach_writer,
    create_targets,
    open_targets,
)
from .temperature import (  # noqa: E402
    arithmetic_log_probs,
    ensemble_log_probs,
    ensemble_probs,
    geometric_log_probs,
    tempered_log_softmax,
    tempered_softmax,
)

__all__ = [
    "FORMAT_VERSION", "ChecksumError", "Manifest", "ManifestError", "StoreError", "TargetStore", "TargetWriter",
    "__version__", "arithmetic_log_probs", "attach_writer", "create_targets", "ensemble_log_probs",
    "ensemble_probs", "geometric_log_probs", "open_targets", "tempered_log_softmax", "tempered_softmax",
]
