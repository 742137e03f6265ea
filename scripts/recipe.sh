#!/usr/bin/env bash
# cnn-mellin's staged recipe (steps 2.1-2.8) is a plan file now: conf/plans/cnn-mellin.ini
# (on the demo corpus, generated here when absent). Extra arguments go to `plan run`.
set -euo pipefail; cd "$(dirname "$0")/.."; export PATH="$PWD/.venv/bin:$PATH"
[ -f exp/demo/data/test/feats.scp ] || python -m stagetune.demo exp/demo/data
exec stagetune plan conf/plans/cnn-mellin.ini run "$@"
