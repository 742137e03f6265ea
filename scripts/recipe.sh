#!/usr/bin/env bash
# cnn-mellin's hyperparameter-search recipe (its README, steps 2.1-2.8), with
# stagetune in place of cnn-mellin and none of the bash + sed glue:
#
#   2.1 init model-sm   --read-ini conf/optim/model-sm.ini; tune model.* only
#                       (--blacklist 'training\..*' 'data\..*'); aggressive
#                       --mem-limit-bytes $MEM_LIMIT_SM; --num-trials $NUM_TRIALS_SM;
#                       --pruner none
#   2.2 run model-sm    random sampler, until `status --check` says the budget
#                       is met (was: optuna trials | grep COMPLETE/PRUNED | wc -l)
#   2.3 important model-sm --top-k $TOP_K_LG > model-lg.params;
#       best model-sm --independent > model-lg.ini;
#       init model-lg   --read-ini model-lg.ini --whitelist $(< model-lg.params),
#                       --mem-limit-bytes $MEM_LIMIT_LG
#   2.4 run model-lg    TPE sampler
#   2.5 best model-sm --set training.max_time_mask=... --set training.max_freq_mask=...
#                       > train-sm.ini (was: best - | sed 's/max_.*_mask = .../');
#       init train-sm   --read-ini train-sm.ini --read-ini conf/optim/train-sm.ini;
#                       --blacklist 'model\..*' 'training\.max_.*_mask'
#                       'training\.num_epochs' 'training\.early_.*'
#   2.6 run train-sm    random sampler
#   2.7 important train-sm --top-k $TOP_K_MD > train-md.params;
#       best train-sm --independent > train-md.ini;
#       init train-md   --read-ini train-md.ini --whitelist $(< train-md.params),
#                       --mem-limit-bytes $MEM_LIMIT_MD
#   2.8 run train-md    random sampler
#
# Each stage reads the .params/.ini files the previous one wrote (under
# $EXP/conf). `stagetune optim ... init --from-study PREV --top-k K` does 2.3/2.7
# in one command; the files are kept here because they are what cnn-mellin
# users edit and inspect. cnn-mellin loops every stage over its model types
# (mcorr, lcorr: its Mellin convolutions) and feature types; stagetune has one
# model family and one data dir per run, so each stage is one study (run the
# script once per data dir with another EXP and DB_URL).
#
# Usage: scripts/recipe.sh [DATA_DIR]
#   DATA_DIR holds train/ and dev/ Kaldi data dirs (no dev/: 10% of train is held
#   out). Default: the demo corpus in exp/demo/data, generated if absent.
#
# Environment (defaults: the demo, a few minutes on 2 CPU cores):
#   DB_URL            study database (sqlite:///$EXP/optim.db); PostgreSQL or
#                     MySQL URLs for workers on several nodes
#   EXP               where configs, checkpoints and the database go (exp/recipe)
#   DEVICE            torch device stored in the studies (cpu)
#   OVERRIDES         --set edits applied to every stage's base config
#                     ("training.num_epochs=3 data.batch_size=4": quick demo
#                     trials; set OVERRIDES= to train as conf/optim/*.ini say)
#   NUM_TRIALS_SM     model-sm budget (8: most of its trials are pruned by the
#                     memory limit within a second or two, as in cnn-mellin)
#   NUM_TRIALS_LG, NUM_TRIALS_TRAIN_SM, NUM_TRIALS_MD   the other budgets (4 each)
#   TOP_K_LG, TOP_K_MD                   parameters kept for lg and md (3, 4)
#   MEM_LIMIT_SM, MEM_LIMIT_MD, MEM_LIMIT_LG   bytes (40, 60, 80 MB: demo-sized;
#                     cnn-mellin used 6, 9 and 12 GiB of GPU memory)
#   MAX_TIME_MASK, MAX_FREQ_MASK         fixed mask widths of the train stages
#                     (30 frames, 15 bins: the top of their search spaces).
#                     cnn-mellin's sed wrote 10000; stagetune caps a mask at the
#                     utterance length and bin count, so 10000 would let one
#                     mask blank out a whole utterance
#   NUM_WORKERS       local workers per stage (2), one torch thread each
#   NUM_DATA_WORKERS  DataLoader workers per trial (0)
#   OPTIM_COMMAND     how a stage's workers are started, called as
#                     `$OPTIM_COMMAND DB_URL STUDY [optim run options]`; default
#                     local_workers (NUM_WORKERS local processes, waited for). On a
#                     cluster: OPTIM_COMMAND="sbatch --array=0-15 --gres=gpu:1
#                     slurm/optim-worker.sbatch"; the script then stops after
#                     submitting, and rerunning it continues once the jobs are done.
#
# Rerunning is safe: existing studies are kept, and a stage whose budget is met
# is skipped. Budgets, memory limits and DEVICE may change between runs (init
# --force replaces them; raise a budget and rerun to extend a stage); a change
# that invalidates a study's trials is refused: use another EXP or DB_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/stagetune ] && export PATH="$PWD/.venv/bin:$PATH"

EXP="${EXP:-exp/recipe}"
DB_URL="${DB_URL:-sqlite:///$EXP/optim.db}"
DEVICE="${DEVICE:-cpu}"
OVERRIDES="${OVERRIDES-training.num_epochs=3 data.batch_size=4}"
NUM_TRIALS_SM="${NUM_TRIALS_SM:-8}"
NUM_TRIALS_LG="${NUM_TRIALS_LG:-4}"
NUM_TRIALS_TRAIN_SM="${NUM_TRIALS_TRAIN_SM:-4}"
NUM_TRIALS_MD="${NUM_TRIALS_MD:-4}"
TOP_K_LG="${TOP_K_LG:-3}"
TOP_K_MD="${TOP_K_MD:-4}"
MEM_LIMIT_SM="${MEM_LIMIT_SM:-40000000}"
MEM_LIMIT_MD="${MEM_LIMIT_MD:-60000000}"
MEM_LIMIT_LG="${MEM_LIMIT_LG:-80000000}"
MAX_TIME_MASK="${MAX_TIME_MASK:-30}"
MAX_FREQ_MASK="${MAX_FREQ_MASK:-15}"
NUM_WORKERS="${NUM_WORKERS:-2}"
NUM_DATA_WORKERS="${NUM_DATA_WORKERS:-0}"
OPTIM_COMMAND="${OPTIM_COMMAND:-local_workers}"

data="${1:-exp/demo/data}"
if [ $# -eq 0 ] && [ ! -f "$data/dev/feats.scp" ]; then
  python -m stagetune.demo "$data"
fi
[ -f "$data/train/feats.scp" ] || { echo "recipe.sh: no $data/train/feats.scp (a prepared Kaldi data dir)" >&2; exit 2; }
if [ -f "$data/dev/feats.scp" ]; then dev=(--dev-dir "$data/dev"); else dev=(--dev-proportion 0.1); fi
conf="$EXP/conf"
mkdir -p "$conf"
sets=()
for kv in $OVERRIDES; do sets+=(--set "$kv"); done
started=$SECONDS

optim() {  # optim STUDY COMMAND [ARGS]: a stagetune optim command on study STUDY
  local study="$1"; shift
  stagetune optim --study-name "$study" "$DB_URL" "$@"
}

init() {  # init STUDY [--read-ini FILE ...] -- [init options]: create (or keep) a study
  local study="$1" inis=(); shift
  while [ "$1" != -- ]; do inis+=("$1"); shift; done; shift
  stagetune "${inis[@]}" "${sets[@]}" --device "$DEVICE" \
    optim --study-name "$study" "$DB_URL" init "$data/train" "${dev[@]}" \
    --num-data-workers "$NUM_DATA_WORKERS" --force "$@"
}

local_workers() {  # local_workers DB_URL STUDY [optim run options]
  local url="$1" study="$2"; shift 2
  stagetune optim --study-name "$study" "$url" run --workers "$NUM_WORKERS" --threads 1 --seed 0 \
    --ckpt-dir "$EXP/ckpt" "$@"
}

run_stage() {  # run_stage STUDY SAMPLER: run workers until the study's budget is met
  local study="$1" sampler="$2"
  if optim "$study" status --check >/dev/null; then
    echo "== $study: budget already met"
    return
  fi
  echo "== $study: $sampler search ($OPTIM_COMMAND)"
  $OPTIM_COMMAND "$DB_URL" "$study" --sampler "$sampler"
  if [ "$OPTIM_COMMAND" != local_workers ]; then
    echo "submitted the workers of $study; rerun $0 when they are done" \
      "(progress: stagetune optim --study-name $study $DB_URL status)"
    exit 0
  fi
  optim "$study" status --check || { echo "recipe.sh: $study did not meet its budget" >&2; exit 1; }
}

echo "== 2.1 model-sm: every model parameter, small model, aggressive memory limit"
init model-sm --read-ini conf/optim/model-sm.ini -- \
  --blacklist 'training\..*' 'data\..*' \
  --mem-limit-bytes "$MEM_LIMIT_SM" --num-trials "$NUM_TRIALS_SM" --pruner none

echo "== 2.2"
run_stage model-sm random

echo "== 2.3 model-lg: the $TOP_K_LG most important model parameters, the rest at their best"
optim model-sm important --top-k "$TOP_K_LG" "$conf/model-lg.params"
optim model-sm best --independent "$conf/model-lg.ini"
mapfile -t lg_params < "$conf/model-lg.params"
init model-lg --read-ini "$conf/model-lg.ini" -- \
  --whitelist "${lg_params[@]}" --mem-limit-bytes "$MEM_LIMIT_LG" --num-trials "$NUM_TRIALS_LG"

echo "== 2.4"
run_stage model-lg tpe

echo "== 2.5 train-sm: training parameters of the best sm model"
optim model-sm best "$conf/train-sm.ini" \
  --set training.max_time_mask="$MAX_TIME_MASK" --set training.max_freq_mask="$MAX_FREQ_MASK"
init train-sm --read-ini "$conf/train-sm.ini" --read-ini conf/optim/train-sm.ini -- \
  --blacklist 'model\..*' 'training\.max_.*_mask' 'training\.num_epochs' 'training\.early_.*' \
  --mem-limit-bytes "$MEM_LIMIT_SM" --num-trials "$NUM_TRIALS_TRAIN_SM"

echo "== 2.6"
run_stage train-sm random

echo "== 2.7 train-md: the $TOP_K_MD most important training parameters"
optim train-sm important --top-k "$TOP_K_MD" "$conf/train-md.params"
optim train-sm best --independent "$conf/train-md.ini"
mapfile -t md_params < "$conf/train-md.params"
init train-md --read-ini "$conf/train-md.ini" -- \
  --whitelist "${md_params[@]}" --mem-limit-bytes "$MEM_LIMIT_MD" --num-trials "$NUM_TRIALS_MD"

echo "== 2.8"
run_stage train-md random

echo
echo "== summary ($((SECONDS - started)) s)"
for study in model-sm model-lg train-sm train-md; do
  optim "$study" status | sed -n '1,5p' | sed 's/^/  /'
done
echo "configs and importance lists: $conf; studies: $DB_URL"
