#!/usr/bin/env bash
# The main job, end to end on the embedded default (SQLite) with the generated
# demo corpus: set up .venv, make the corpus, run a small staged search with 2
# local workers per stage (a random "sm" stage of short trials ranked by dev loss,
# then a TPE "lg" stage chained with --from-study and pruning, each starting
# with its base config as trial 0), then train the best config and the shipped
# default config for the same number of epochs and evaluate both on test.
# Rerunning continues where it stopped (studies, checkpoints and data are kept
# under exp/demo); remove exp/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"

exp=exp/demo
data=$exp/data
db="sqlite:///$exp/optim.db"
final_epochs=8
mkdir -p "$exp"
[ -f "$data/test/feats.scp" ] || python -m stagetune.demo "$data"

workers() {  # two local workers on study $1 with sampler $2: a pool forks them (seeds 1 and 2)
  stagetune optim --study-name "$1" "$db" run --workers 2 --sampler "$2" --seed 1 \
    --ckpt-dir "$exp/ckpt" --threads 1
}

echo "== stage sm: random search over 8 knobs from the shipped defaults (trial 0), 3-epoch trials ranked by dev loss"
stagetune --set training.num_epochs=3 optim --study-name demo-sm "$db" init "$data/train" --dev-dir "$data/dev" \
  --whitelist 'model\.recurrent_(layers|size|type)' 'model\.convolutional_(layers|initial_channels)' \
    'training\.(learning_rate|dropout_prob|num_time_mask|num_freq_mask)' \
  --mem-limit-bytes 150000000 --num-trials 8 --pruner none --metric loss --enqueue-base
stagetune optim --study-name demo-sm "$db" status --check >/dev/null || workers demo-sm random

echo "== stage lg: TPE over the 3 most important parameters from the best sm config (trial 0), $final_epochs-epoch trials, pruning"
stagetune optim --study-name demo-lg "$db" init --from-study demo-sm --top-k 3 --enqueue-base \
  --set training.num_epochs=$final_epochs --num-trials 6 --pruner median --metric error+loss
stagetune optim --study-name demo-lg "$db" status --check >/dev/null || workers demo-lg tpe

echo "== final: the best lg config and the shipped default config, each trained $final_epochs epochs"
stagetune optim --study-name demo-lg "$db" important --verbose "$exp/lg.params" 2>"$exp/lg.importance"
stagetune optim --study-name demo-lg "$db" best "$exp/best.ini"
stagetune --read-ini "$exp/best.ini" train "$data/train" "$data/dev" "$exp/final" --threads 1 --quiet &
stagetune --set training.num_epochs=$final_epochs train "$data/train" "$data/dev" "$exp/default" --threads 1 --quiet &
wait
stagetune evaluate "$exp/final/model.pt" "$data/test" --out "$exp/final/test.hyp" >"$exp/test.result"
stagetune evaluate "$exp/default/model.pt" "$data/test" --out "$exp/default/test.hyp" >"$exp/default.result"

echo
echo "== summary"
echo "default config, test: $(cat "$exp/default.result")"
echo "best found,     test: $(cat "$exp/test.result")"
echo "most important parameters (demo-lg):"; sed 's/^/  /' "$exp/lg.importance" | head -5
echo "best config: $exp/best.ini; model: $exp/final/model.pt"
echo "studies: $db (stagetune optim --study-name demo-lg $db status)"
echo "browse them: pip install optuna-dashboard && optuna-dashboard $db"
