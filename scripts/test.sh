#!/usr/bin/env bash
# The full test suite on a fresh machine: system packages (MariaDB server),
# .venv with the test extras, then pytest (the fixtures start PostgreSQL and
# MariaDB themselves on 127.0.0.1 and stop them at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
bash scripts/setup_venv.sh test
# Two pytest processes, a test file each at a time (--dist loadfile keeps a file's
# fixtures in one process); the longest files start first (tests/conftest.py;
# --no-loadscope-reorder keeps that order instead of the files with most tests first).
# Most tests use one core, so on 2 cores this about halves the wall time.
exec .venv/bin/python -m pytest -q -n "${STAGETUNE_TEST_PROCESSES:-2}" --dist loadfile --no-loadscope-reorder \
  --durations=25 "$@"
