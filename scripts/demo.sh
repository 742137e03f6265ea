#!/usr/bin/env bash
# The main job, end to end on the embedded default (SQLite) with the generated
# demo corpus: set up .venv, make the corpus, run the staged search that
# conf/plans/demo.ini declares (a random "sm" stage of short trials ranked by dev
# loss, then a TPE "lg" stage derived from sm's importance and best config, with
# pruning; 2 local workers per stage; each stage starts with its base config as
# trial 0), which ends by training and evaluating lg's best config. Beside it, the
# shipped default config is trained as long, and both are printed.
# The plan is the packaged @plans/demo (conf/plans/demo.ini) with its paths under
# exp/demo, written to exp/demo/demo.ini.
# Rerunning continues where it stopped (studies, checkpoints and data are kept
# under exp/demo); remove exp/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"

# `stagetune demo` does every step (installed, it runs from any directory:
# `stagetune demo [OUT_DIR] [--size tiny]`); see `stagetune demo --help`.
exec stagetune demo exp/demo "$@"
