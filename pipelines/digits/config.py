"""The pipeline's configuration: ``config.toml`` beside this file, a user's TOML merged over it, ``quick.toml`` last.

A user config may set any subset of the keys of ``config.toml`` (tables merge key by key);
an unknown table or key, a wrong type or a value out of range is refused with a message that
names the file and the key.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import softtargets.cli.config

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.toml"
QUICK_CONFIG = HERE / "quick.toml"
RULES = ("geometric", "arithmetic")


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict; ``FileNotFoundError`` / ``ValueError`` naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} not found")
    return softtargets.cli.config.read_toml(path)


def merge(base: dict[str, Any], over: dict[str, Any], source: str, where: str = "") -> dict[str, Any]:
    """``base`` updated by ``over`` table by table; keys not in ``base`` are refused (``ValueError``)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base:
            raise ValueError(f"{source}: unknown key {name!r}; allowed here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {name!r} must be a table")
            out[key] = merge(base[key], value, source, f"{name}.")
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, quick: bool = False) -> dict[str, Any]:
    """The run's config: defaults, then ``path`` (if given), then ``quick.toml`` (if ``quick``); checked."""
    cfg = read_toml(DEFAULT_CONFIG)
    source = str(DEFAULT_CONFIG)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG:
        source = str(path)
        cfg = merge(cfg, read_toml(path), source)
    if quick:
        cfg = merge(cfg, read_toml(QUICK_CONFIG), str(QUICK_CONFIG))
    check(cfg, source)
    return cfg


def _require(ok: bool, source: str, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{source}: {key} must be {what}, got {value!r}")


def _ints(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check(cfg: dict[str, Any], source: str) -> None:
    """Types and ranges of the values the pipeline relies on."""
    r = _require
    r(isinstance(cfg["workers"], int) and cfg["workers"] >= 1, source, "workers", "an integer >= 1", cfg["workers"])
    sr = cfg["store"]["shard_rows"]
    r(isinstance(sr, int) and sr >= 0, source, "store.shard_rows", "an integer >= 0 (0 = default)", sr)
    r(isinstance(cfg["threads"], int) and cfg["threads"] >= 1, source, "threads", "an integer >= 1", cfg["threads"])
    r(isinstance(cfg["split"]["seed"], int), source, "split.seed", "an integer", cfg["split"]["seed"])
    fr = cfg["split"]["fractions"]
    r(isinstance(fr, list) and len(fr) == 3 and all(_positive(f) for f in fr) and math.isclose(sum(fr), 1.0),
      source, "split.fractions", "three positive numbers summing to 1", fr)
    for table in ("teacher", "student"):
        t = cfg[table]
        r(_ints(t["hidden"]) and min(t["hidden"]) > 0, source, f"{table}.hidden", "a list of layer widths",
          t["hidden"])
        for key in ("epochs", "batch_size"):
            r(isinstance(t[key], int) and t[key] >= 1, source, f"{table}.{key}", "an integer >= 1", t[key])
        r(_positive(t["lr"]), source, f"{table}.lr", "a number > 0", t["lr"])
    for key in ("dropout_in", "dropout_hidden", "jitter_prob"):
        v = cfg["teacher"][key]
        r(isinstance(v, (int, float)) and 0 <= v < 1, source, f"teacher.{key}", "in [0, 1)", v)
    seeds = cfg["ensemble"]["seeds"]
    r(_ints(seeds) and len(set(seeds)) == len(seeds), source, "ensemble.seeds", "distinct integers", seeds)
    s = cfg["student"]["seeds"]
    r(_ints(s) and len(set(s)) == len(s), source, "student.seeds", "distinct integers", s)
    d = cfg["distill"]
    r(isinstance(d["temperatures"], list) and d["temperatures"] and all(_positive(t) for t in d["temperatures"]),
      source, "distill.temperatures", "a list of numbers > 0", d["temperatures"])
    r(isinstance(d["alphas"], list) and d["alphas"] and all(isinstance(a, (int, float)) and 0 < a <= 1
                                                            for a in d["alphas"]),
      source, "distill.alphas", "a list of numbers in (0, 1]", d["alphas"])
    r(isinstance(d["rules"], list) and d["rules"] and set(d["rules"]) <= set(RULES), source, "distill.rules",
      f"a list drawn from {list(RULES)}", d["rules"])
    m = cfg["mythical"]
    r(isinstance(m["digit"], int) and 0 <= m["digit"] <= 9, source, "mythical.digit", "a digit 0-9", m["digit"])
    g = m["bias_grid"]
    r(isinstance(g, list) and len(g) == 3 and _positive(g[2]) and g[1] >= g[0], source, "mythical.bias_grid",
      "[start, stop, step] with stop >= start and step > 0", g)
    r(cfg["store"]["content"] == "per_teacher", source, "store.content",
      "'per_teacher' (both ensemble rules at every T need the per-teacher logits)", cfg["store"]["content"])
