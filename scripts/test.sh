#!/usr/bin/env bash
# The full test suite on a fresh machine: system packages (MariaDB server),
# .venv with the test extras, then pytest (the fixtures start PostgreSQL and
# MariaDB themselves on 127.0.0.1 and stop them at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
bash scripts/setup_venv.sh test
exec .venv/bin/python -m pytest -q "$@"
