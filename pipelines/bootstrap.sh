#!/usr/bin/env bash
# Make ./.venv with softtargets (editable) and what its tests and pipelines need.
# Pins the CPU build of torch for machines without a GPU; bring your own CUDA torch elsewhere
# (the package itself only asks for a range). Safe to re-run: it skips a venv that is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.softtargets-installed
want=$(cat pyproject.toml pipelines/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
    echo "$want" > "$stamp"
fi
