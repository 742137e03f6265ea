#!/usr/bin/env bash
# Build the FSDD connected-digit corpus and compute its features.
#
# Usage: scripts/prep_fsdd.sh [--tiny] OUT_DIR
#
# Reads the recordings from $FSDD_DIR (default: ../shared/data/fsdd/recordings
# next to the repository), writes OUT_DIR/{train,dev,test} with wavs, text,
# utt2spk and features.  --tiny builds the small yesno-like corpus instead (2
# digits, 8 per utterance, one speaker per split; see `python -m stagetune.fsdd
# --help`).  A thin wrapper of `stagetune prep-fsdd` (installed, that runs from
# any directory); uses the `stagetune` on PATH, so activate the project's virtual
# environment first.  The result is CC BY-SA 4.0, like the recordings:
# keep it out of the repository.
set -euo pipefail

tiny=()
if [[ ${1:-} == --tiny ]]; then
    tiny=(--tiny)
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--tiny] OUT_DIR" >&2
    exit 2
fi
out_dir=$1
fsdd_dir=${FSDD_DIR:-"$(dirname "$0")/../../shared/data/fsdd/recordings"}

exec stagetune prep-fsdd "${tiny[@]}" --recordings "$fsdd_dir" "$out_dir"
