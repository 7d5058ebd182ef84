"""softtargets: offline soft targets for knowledge distillation.

Stage one runs a teacher ensemble once and writes its logits into a target store
(Zarr or WebDataset, described by one manifest); stage two streams the store into
training, where the student's loss applies any temperature and ensemble rule.
"""

from ._version import __version__
from .errors import JoinMismatchError, PreflightError, SofttargetsError, StorageAccessError
from .math.augment import RandomView
from .math.compact import CompactSpec
from .math.compact_losses import compact_kd_loss, hidden_kd_loss, sampled_kd_loss, topk_kd_loss
from .math.hints import hint_loss
from .math.losses import DistillationLoss, distillation_loss, kd_loss, logit_matching_loss
from .math.specialists import (
    active_specialists,
    collapse_to_subset,
    combine_specialists,
    dustbin_corrected,
    oversampling_factor,
)
from .math.temperature import (
    arithmetic_log_probs,
    ensemble_log_probs,
    ensemble_probs,
    geometric_log_probs,
    reduce_teachers,
    tempered_log_softmax,
    tempered_softmax,
)
from .precompute import NonFiniteError, precompute
from .precompute.contents import encode_rows
from .precompute.hints import add_hints
from .precompute.sequences import precompute_sequences
from .precompute.specialists import add_specialists
from .sharing.combine import merge_stores, subset_store
from .sharing.convert import convert_store
from .sharing.inspect import inspect_store
from .sharing.specialists_plan import plan_specialists
from .sharing.verify import VerifyReport, verify_store
from .store import (
    ChecksumError,
    StoreError,
    TargetStore,
    TargetWriter,
    attach_writer,
    create_targets,
    open_targets,
)
from .store.compact_rows import unpack_rows
from .store.manifest import FORMAT_VERSION, Manifest, ManifestError
from .store.sequences import SequenceStore, SequenceWriter, create_sequences, open_sequences
from .store.sidecars import read_array
from .streaming import StreamLoader, TargetStream, stream
from .streaming.joined import TargetJoin, ViewTargetJoin, with_targets
from .streaming.sequences import SequenceLoader, SequenceStream, stream_sequences
from .streaming.specialists import SpecialistBatches, specialist_from_generalist, specialist_labels
from .streaming.views import ViewStream, epoch_view

__all__ = [
    "FORMAT_VERSION",
    "ChecksumError",
    "CompactSpec",
    "DistillationLoss",
    "Manifest",
    "NonFiniteError",
    "RandomView",
    "JoinMismatchError",
    "ManifestError",
    "PreflightError",
    "SequenceLoader",
    "SequenceStore",
    "SequenceStream",
    "SequenceWriter",
    "SofttargetsError",
    "SpecialistBatches",
    "StorageAccessError",
    "StoreError",
    "StreamLoader",
    "TargetJoin",
    "TargetStore",
    "TargetStream",
    "TargetWriter",
    "VerifyReport",
    "ViewStream",
    "ViewTargetJoin",
    "__version__",
    "active_specialists",
    "add_hints",
    "add_specialists",
    "arithmetic_log_probs",
    "attach_writer",
    "collapse_to_subset",
    "combine_specialists",
    "compact_kd_loss",
    "convert_store",
    "create_sequences",
    "create_targets",
    "distillation_loss",
    "dustbin_corrected",
    "encode_rows",
    "ensemble_log_probs",
    "epoch_view",
    "ensemble_probs",
    "geometric_log_probs",
    "hidden_kd_loss",
    "hint_loss",
    "inspect_store",
    "kd_loss",
    "logit_matching_loss",
    "merge_stores",
    "open_sequences",
    "open_targets",
    "oversampling_factor",
    "plan_specialists",
    "precompute",
    "precompute_sequences",
    "read_array",
    "reduce_teachers",
    "sampled_kd_loss",
    "specialist_from_generalist",
    "specialist_labels",
    "stream",
    "stream_sequences",
    "subset_store",
    "tempered_log_softmax",
    "tempered_softmax",
    "topk_kd_loss",
    "unpack_rows",
    "verify_store",
    "with_targets",
]
