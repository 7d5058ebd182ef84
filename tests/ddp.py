"""Real torch.distributed ranks for tests: ``spawn_ranks(fn, *args)`` runs ``fn(rank, port, *args)`` in
``world`` gloo-ready processes on 127.0.0.1 (``mp.spawn``), and ``init_gloo`` joins them into one group."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int, timeout_s: float = 60) -> None:
    """Join the gloo group of ``world`` ranks rendezvousing at ``127.0.0.1:port``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def spawn_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """``fn(rank, port, *args)`` in ``world`` spawned processes (``fn`` at a module's top level); raises when
    any of them fails."""
    mp.spawn(fn, args=(free_port(), *args), nprocs=world, join=True)
