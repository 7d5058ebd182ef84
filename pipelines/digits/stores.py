"""Stage one through ``softtargets.precompute``: the teachers' per-teacher logits of a transfer set, into a store.

Teachers and transfer set are given by import path (``pipelines.digits.models:make_teacher`` +
saved weights; ``pipelines.digits.data:transfer_set``), the same specs a ``softtargets precompute``
TOML config holds: :func:`write_precompute_config` writes that config beside the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import softtargets as st

from . import models as M
from .data import DigitsRows
from .teachers import teacher_paths

LAYOUT_SUFFIX = {"zarr": ".zarr", "wds": ".wds"}


def teacher_specs(cfg: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Teachers for ``st.precompute`` by import path + saved weights (what a precompute config holds)."""
    t = cfg["teacher"]
    kwargs = {"hidden": list(t["hidden"]), "dropout_in": t["dropout_in"], "dropout_hidden": t["dropout_hidden"]}
    seeds = cfg["ensemble"]["seeds"]
    return [{"name": f"teacher-{s}", "factory": "pipelines.digits.models:make_teacher", "kwargs": kwargs,
             "weights": str(p)} for s, p in zip(seeds, teacher_paths(out, seeds), strict=True)]


def transfer_spec(cfg: dict[str, Any], leave_out: int | None) -> dict[str, Any]:
    """The transfer set for ``st.precompute`` by import path: the training split (less ``leave_out``)."""
    kwargs: dict[str, Any] = {"seed": cfg["split"]["seed"], "fractions": list(cfg["split"]["fractions"])}
    if leave_out is not None:
        kwargs["leave_out"] = leave_out
    name = "digits-train" if leave_out is None else f"digits-train-without-{leave_out}"
    return {"factory": "pipelines.digits.data:transfer_set", "kwargs": kwargs, "name": name}


def store_url(out: Path, name: str, layout: str) -> Path:
    return out / "stores" / f"{name}{LAYOUT_SUFFIX[layout]}"


def precompute_kwargs(cfg: dict[str, Any], out: Path, name: str, layout: str, leave_out: int | None
                      ) -> dict[str, Any]:
    """Keyword arguments of ``st.precompute`` for the store ``<out>/stores/<name>.<layout>``."""
    s = cfg["store"]
    kwargs: dict[str, Any] = {
        "teachers": teacher_specs(cfg, out), "dataset": transfer_spec(cfg, leave_out),
        "out": str(store_url(out, name, layout)), "content": s["content"], "layout": layout, "dtype": s["dtype"],
        "class_names": [str(c) for c in range(10)], "batch_size": s["batch_size"], "num_workers": s["num_workers"],
        "device": "cpu",
    }
    if s["shard_rows"]:
        kwargs["shard_rows"] = s["shard_rows"]
    if s["scheduler"] == "dask":
        kwargs.update(scheduler="dask", workers=1)  # a LocalCluster of one worker process
    else:
        kwargs["scheduler"] = s["scheduler"]
    return kwargs


def precompute_store(kwargs: dict[str, Any], progress: bool) -> float:
    """Stage one (replacing any store at ``kwargs["out"]``); returns its wall seconds."""
    t0 = time.perf_counter()
    st.precompute(**kwargs, overwrite=True, progress=progress)
    return time.perf_counter() - t0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def write_precompute_config(kwargs: dict[str, Any], out: Path, path: Path) -> Path:
    """The same stage one as a ``softtargets precompute`` config, paths relative to ``out`` (where it is written).

    Run it from the repository root, so that ``pipelines`` imports:
    ``python -m softtargets.cli precompute <out>/precompute-train.toml --overwrite``.
    """

    def rel(p: str) -> str:
        return str(Path(p).relative_to(out))

    lines = ["# stage one of pipelines.digits as a `softtargets precompute` config; run from the repository root:",
             f"#   python -m softtargets.cli precompute {path} --overwrite", ""]
    lines += [f"{k} = {_toml(kwargs[k])}" for k in ("batch_size", "num_workers", "device")]
    output = {"url": rel(kwargs["out"]), **{k: kwargs[k] for k in ("layout", "content", "dtype", "shard_rows",
                                                                    "class_names") if k in kwargs}}
    lines += ["", "[output]", *(f"{k} = {_toml(v)}" for k, v in output.items())]
    lines += ["", "[transfer_set]", *(f"{k} = {_toml(v)}" for k, v in kwargs["dataset"].items())]
    cluster = {"scheduler": kwargs["scheduler"]} if kwargs["scheduler"] else {"workers": kwargs["workers"]}
    lines += ["", "[cluster]", *(f"{k} = {_toml(v)}" for k, v in cluster.items())]
    for t in kwargs["teachers"]:
        lines += ["", "[[teachers]]", *(f"{k} = {_toml(rel(v) if k == 'weights' else v)}" for k, v in t.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def store_summary(url: str, seconds: float) -> dict[str, Any]:
    """What results.json records of a store: its URL and the manifest's main facts."""
    store = st.open_targets(url, verify="full")
    m = store.manifest
    return {
        "url": url, "layout": m.layout, "content": m.content, "dtype": m.dtype,
        "logits_shape": list(m.logits_shape), "num_shards": m.num_shards, "shard_rows": m.shard_rows,
        "bytes": m.nbytes, "transfer_set": m.transfer_set,
        "teachers": [{"name": t["name"], "sha256": t["sha256"]} for t in m.teachers],
        "labeled": sum(s.labeled for s in m.shards), "clipped_values": m.clipped_values,
        "precompute_seconds": seconds,
    }


def store_matches_teachers(url: str, teachers: Sequence[torch.nn.Module], rows: DigitsRows) -> float:
    """Largest |stored - direct| over the store's rows: teachers run here on the rows' images, zero-meaned."""
    store = st.open_targets(url)
    got = store[:]
    position = {k: i for i, k in enumerate(rows.keys)}
    x = rows.x[[position[k] for k in got["key"]]]
    direct = M.teacher_logits(teachers, x)
    return float((got["logits"].float() - direct).abs().max())


def build_stores(cfg: dict[str, Any], out: Path, layout: str, teachers: Sequence[torch.nn.Module],
                 train_rows: DigitsRows, progress: bool) -> dict[str, dict[str, Any]]:
    """Both stores (the training split; it without the mythical digit), each checked against ``teachers``
    run directly, each with its ``softtargets precompute`` config; returns their summaries by name."""
    digit = cfg["mythical"]["digit"]
    stores = {}
    for name, leave_out in (("train", None), (f"train-without-{digit}", digit)):
        kwargs = precompute_kwargs(cfg, out, name, layout, leave_out)
        seconds = precompute_store(kwargs, progress)
        summary = store_summary(kwargs["out"], seconds)
        summary["max_abs_diff_vs_teachers"] = store_matches_teachers(kwargs["out"], teachers, train_rows)
        summary["precompute_config"] = str(write_precompute_config(kwargs, out, out / f"precompute-{name}.toml"))
        stores[name] = summary
        print(f"{summary['url']}: {summary['logits_shape']} {summary['dtype']} in {summary['num_shards']} shard(s), "
              f"{seconds:.2f} s; max |stored - teachers| {summary['max_abs_diff_vs_teachers']:.1e}")
    return stores
