"""The choices softtargets' functions take, as ``Literal`` types, and the one helper that checks a value
against one: :func:`parse_choice`. A signature says what it accepts (``layout: Layout``); the function
parses the value once, where it enters, with the same message everywhere.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = [
    "Autocast",
    "Compressor",
    "Content",
    "Dtype",
    "JoinBy",
    "Layout",
    "Loss",
    "LossForm",
    "NonFinite",
    "Normalization",
    "Overflow",
    "Reduction",
    "Remainder",
    "Rule",
    "SampleLayout",
    "ScheduleKind",
    "VerifyMode",
    "WriteMode",
    "choices",
    "parse_choice",
]

Layout = Literal["zarr", "wds"]
"""How a store lays its files out: zarr arrays or WebDataset tar shards."""
Content = Literal["per_teacher", "geometric", "arithmetic"]
"""What a store holds: every teacher's logits, their mean logits, or the log of their mean probabilities."""
Dtype = Literal["float32", "float16", "bfloat16"]
"""The storage dtype of the logits."""
VerifyMode = Literal["lazy", "full", "none"]
"""When a reader checks data files against the manifest: on first read, all at open, or never."""
Rule = Literal["geometric", "arithmetic"]
"""How teachers' distributions are combined into one."""
Overflow = Literal["error", "clip"]
"""What a float16 store does with values beyond its range."""
Normalization = Literal["zero_mean", "none"]
"""Whether each row's mean is subtracted before storing."""
NonFinite = Literal["error", "uniform"]
"""What stage one does with NaN or Inf teacher logits."""
Autocast = Literal["bf16", "fp16"]
"""Mixed precision for the teachers' forward pass (``None``: off)."""
Compressor = Literal["none", "zstd", "blosc"]
"""The zarr layout's logits compressor."""
SampleLayout = Literal["block", "sample"]
"""The wds layout's rows per tar sample: many (``block``) or one (``sample``)."""
Remainder = Literal["pad", "drop"]
"""What the last ranks do with rows that do not divide evenly."""
JoinBy = Literal["index", "key"]
"""How a dataset is joined to a store: by row number or by sample key."""
WriteMode = Literal["create", "overwrite", "resume"]
"""How a writer treats what is already at its URL."""
Reduction = Literal["mean", "sum", "none"]
"""How a loss reduces over the batch."""
LossForm = Literal["kl", "ce"]
"""The distillation loss's form: KL(p || q) or cross-entropy."""
Loss = Literal["hinton", "logit_matching"]
"""The training loop's loss."""
ScheduleKind = Literal["linear", "cosine", "exponential"]
"""The shape of a temperature schedule."""

T = TypeVar("T")


def choices(alias: Any) -> tuple[Any, ...]:
    """The values ``alias`` admits, in order: a ``Literal`` alias, an ``Optional`` / union of them (``None``
    for ``NoneType``), or any iterable of values (a registry's keys)."""
    if alias is type(None):
        return (None,)
    origin = get_origin(alias)
    if origin is Literal:
        return get_args(alias)
    if origin is Union or origin is types.UnionType:
        return tuple(value for member in get_args(alias) for value in choices(member))
    if isinstance(alias, Iterable) and not isinstance(alias, str):
        return tuple(alias)
    raise TypeError(f"not a Literal alias or a collection of choices: {alias!r}")


def parse_choice(name: str, value: T, alias: Any, *, note: str = "") -> T:
    """``value`` unchanged if ``alias`` admits it, else a ``ValueError`` naming ``name``, the value and the
    choices.

    Args:
        name: what the value is, as the message says it (``"layout"``, ``"verify mode"``).
        value: the value given.
        alias: a ``Literal`` alias (or ``Optional`` of one), or a collection of the admitted values.
        note: appended to the message (what the choices mean).

    Returns:
        ``value``.

    Raises:
        ValueError: ``unknown {name} {value!r}; expected one of 'a', 'b'``.

    Example:
        >>> parse_choice("layout", "zarr", Layout)
        'zarr'
    """
    admitted = choices(alias)
    if value in admitted:
        return value
    listed = ", ".join(repr(v) for v in admitted)
    raise ValueError(f"unknown {name} {value!r}; expected one of {listed}" + (f" {note}" if note else ""))
