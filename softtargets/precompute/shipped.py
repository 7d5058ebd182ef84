"""Objects holding CPU tensors, pickled with the tensors' bytes out of band, for dask to send.

dask pickles a task's arguments with protocol 5 and sends out-of-band buffers as frames of their
own, without copying them into the pickle stream; a torch tensor, though, pickles its storage
in band (through ``torch.save``), so a large ``TensorDataset`` reaches a worker far more slowly than
as out-of-band buffers. :class:`Shipped` pickles the object it wraps with every CPU tensor
reduced to the bytes of its elements (a ``PickleBuffer``), dtype and shape; objects the tensors
belong to (``nn.Parameter``, modules, datasets) pickle as usual around them, so a parameter used
twice (tied weights) is still one parameter when unpickled. Tensors come back as fresh, writable,
contiguous copies in torch's own memory (the frames received may be read-only or unaligned): a view
travels as its own elements, not its base's whole storage, and shares memory with no other tensor.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

__all__ = ["Shipped"]


class _TensorBytesPickler(pickle.Pickler):
    """Pickles dense CPU tensors as ``(their elements' bytes, out of band; dtype; shape)``."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor or obj.device.type != "cpu" or obj.layout != torch.strided \
                or obj.is_quantized or obj.requires_grad:
            return NotImplemented
        dense = obj.resolve_conj().resolve_neg().contiguous().reshape(-1)
        return _tensor, (pickle.PickleBuffer(dense.view(torch.uint8).numpy().data), obj.dtype, tuple(obj.shape))


def _tensor(raw: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)  # torch's own (aligned) memory
    out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(raw, np.uint8)
    return out


def _unship(data: bytes, *buffers: Any) -> Any:
    return pickle.loads(data, buffers=buffers)


class Shipped:
    """Wraps ``obj`` for pickling; unpickles to ``obj`` itself (not to a ``Shipped``)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Any, ...]:
        buffers: list[pickle.PickleBuffer] = []
        stream = io.BytesIO()
        _TensorBytesPickler(stream, protocol=5, buffer_callback=buffers.append).dump(self.obj)
        return _unship, (stream.getvalue(), *buffers)
