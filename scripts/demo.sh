#!/usr/bin/env bash
# The main job, end to end on the embedded default (SQLite) with the generated
# demo corpus: set up .venv, make the corpus, run the staged search that
# conf/plans/demo.ini declares (a random "sm" stage of short trials ranked by dev
# loss, then a TPE "lg" stage derived from sm's importance and best config, with
# pruning; 2 local workers per stage; each stage starts with its base config as
# trial 0), which ends by training and evaluating lg's best config. Beside it, the
# shipped default config is trained as long, and both are printed.
# Rerunning continues where it stopped (studies, checkpoints and data are kept
# under exp/demo); remove exp/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"

exp=exp/demo
data=$exp/data
final_epochs=8  # as conf/plans/demo.ini's final_epochs
mkdir -p "$exp"
[ -f "$data/test/feats.scp" ] || python -m stagetune.demo "$data"

# the shipped default config, for comparison, on the core the plan leaves idle
# (it resumes when rerun; a finished one returns at once)
nice -n 5 stagetune --set training.num_epochs=$final_epochs train "$data/train" "$data/dev" "$exp/default" \
  --threads 1 --quiet &
default=$!
stagetune plan conf/plans/demo.ini run --workers 2
wait "$default"
stagetune evaluate "$exp/default/model.pt" "$data/test" --out "$exp/default/test.hyp" >"$exp/default.result"
stagetune evaluate "$exp/final/model.pt" "$data/test" --out "$exp/final/test.hyp" >"$exp/test.result"

echo
echo "== summary"
stagetune plan conf/plans/demo.ini status
echo "default config, test: $(cat "$exp/default.result")"
echo "best found,     test: $(cat "$exp/test.result")"
echo "best config: $exp/best.ini; model: $exp/final/model.pt"
echo "studies: sqlite:///$exp/optim.db (stagetune optim --study-name demo-lg sqlite:///$exp/optim.db status)"
echo "browse them: pip install optuna-dashboard && optuna-dashboard sqlite:///$exp/optim.db"
