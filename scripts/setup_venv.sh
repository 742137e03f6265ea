#!/usr/bin/env bash
# Create .venv (if missing) and install stagetune into it, with extras given as $1
# (e.g. "test"). torch is pinned to the CPU wheel this machine provides; on a GPU
# cluster use environment.yaml instead.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  python3 -m venv .venv
fi
stamp=".venv/.stagetune-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
