"""Imports run one way: the helpers and the math at the bottom, the format above them, the three parts
(stage one, stage two, sharing) above the format and beside each other, the CLI on top.

Every module under ``softtargets/`` is parsed with ``ast``; every import of ``softtargets`` or of a module
in it (absolute or relative, at the top or inside a function) is resolved to the module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "softtargets"

# The folder (or top-level module) of each layer -> its rank. A module may import its own layer and the
# ones below it; the three parts at rank 3 may not import each other.
LAYERS: dict[str, int] = {
    "_version": 0, "forksafe": 0, "background": 0, "text": 0, "importing": 0,  # helpers shared by every layer
    "errors": 0, "choices": 0,
    "math": 1,                                                                  # pure torch/numpy
    "store": 2,                                                                 # the format
    "precompute": 3, "streaming": 3, "sharing": 3,                              # stage one, stage two, sharing
    "cli": 4,                                                                   # the command line
    "": 5,                                                                      # softtargets/__init__.py
}
PARTS = ("precompute", "streaming", "sharing")


def module_name(path: Path, package: Path) -> str:
    """``softtargets/store/base.py`` -> ``softtargets.store.base``; a package's ``__init__.py`` -> the package."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """The ``softtargets`` modules that ``source`` (the text of ``module``) imports, anywhere in it.

    ``from X import name`` counts as ``X.name`` (a submodule or a name in X: both live where X.name says).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found += [f"{prefix}.{alias.name}" if alias.name != "*" else prefix for alias in node.names]
    return [name for name in found if name == "softtargets" or name.startswith("softtargets.")]


def layer_of(name: str, package: Path) -> str:
    """The layer key of a ``softtargets`` module, or of a name in one: the folder or top-level module it is in
    (``""`` for the package root and the names its ``__init__.py`` defines)."""
    parts = name.split(".")
    if len(parts) == 1:
        return ""
    if (package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file():
        return parts[1]
    return ""  # softtargets.__version__, softtargets.precompute (the function)...


def violations(package: Path) -> list[str]:
    """One line per import that goes the wrong way, naming the importing module and the imported one."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        here = layer_of(module, package)
        if here not in LAYERS:
            found.append(f"{module}: not in any layer (add its folder to LAYERS in tests/test_layers.py)")
            continue
        for target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            there = layer_of(target, package)
            if there not in LAYERS:
                found.append(f"{module} imports {target}: not in any layer")
            elif LAYERS[there] > LAYERS[here]:
                found.append(f"{module} (layer {here or 'root'}) imports {target} (layer {there or 'root'}, above it)")
            elif there != here and there in PARTS and here in PARTS:
                found.append(f"{module} ({here}) imports {target} ({there}): the parts may not import each other")
    return found


def test_imports_run_one_way():
    found = violations(PACKAGE)
    assert not found, "imports against the layer rule (see CONTRIBUTING.md, Code):\n" + "\n".join(found)


def test_every_layer_exists():
    for name in LAYERS:
        if name:
            assert (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file(), name


def make_package(root: Path, sources: dict[str, str]) -> Path:
    """A ``softtargets`` tree under ``root`` with every layer (empty modules) and ``sources`` written over it."""
    package = root / "softtargets"
    skeleton = {"__init__.py": "", **{f"{name}.py": "" for name in LAYERS if name and LAYERS[name] == 0},
                **{f"{name}/__init__.py": "" for name in LAYERS if LAYERS[name] > 0 and name}}
    for rel, text in {**skeleton, **sources}.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    return package


@pytest.mark.parametrize(
    ("where", "source", "message"),
    [
        ("store/base.py", "from .. import __version__\n",
         "softtargets.store.base (layer store) imports softtargets.__version__"),
        ("store/base.py", "def f():\n    from ..sharing.card import x\n",
         "imports softtargets.sharing.card.x (layer sharing"),
        ("math/losses.py", "import softtargets.store.files\n",
         "softtargets.math.losses (layer math) imports softtargets.store"),
        ("streaming/joined.py", "from ..precompute.engine import precompute\n", "the parts may not import each other"),
        ("sharing/verify.py", "from softtargets.cli import main\n", "imports softtargets.cli.main (layer cli"),
        ("forksafe.py", "from .math import temperature\n", "softtargets.forksafe (layer forksafe) imports"),
        ("extra.py", "", "softtargets.extra: not in any layer"),
    ],
)
def test_a_wrong_way_import_is_named(tmp_path, where, source, message):
    found = violations(make_package(tmp_path, {where: source}))
    assert len(found) == 1 and message in found[0], found


def test_imports_down_and_within_a_layer_pass(tmp_path):
    package = make_package(tmp_path, {
        "__init__.py": "from .cli import main\nfrom .precompute import precompute\n",
        "cli/__init__.py": "from ..sharing import verify\nimport softtargets.precompute.engine\n",
        "sharing/__init__.py": "from ..store import base\nfrom ..math import losses\nfrom . import verify\n",
        "store/__init__.py": "def f():\n    from ..math.temperature import x\nfrom .._version import __version__\n",
        "math/__init__.py": "import torch\nfrom ..forksafe import ForkSafeLock\n",
    })
    assert violations(package) == []
