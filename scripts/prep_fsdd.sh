#!/usr/bin/env bash
# Build the FSDD connected-digit corpus and compute its features.
#
# Usage: scripts/prep_fsdd.sh OUT_DIR
#
# Reads the recordings from $FSDD_DIR (default: ../shared/data/fsdd/recordings
# next to the repository), writes OUT_DIR/{train,dev,test} with wavs, text,
# utt2spk and features.  Uses the `python` and `stagetune` on PATH, so activate
# the project's virtual environment first.  The result is CC BY-SA 4.0, like the
# recordings: keep it out of the repository.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
fsdd_dir=${FSDD_DIR:-"$(dirname "$0")/../../shared/data/fsdd/recordings"}

python -m stagetune.fsdd "$fsdd_dir" "$out_dir"
for split in train dev test; do
    stagetune prep "$out_dir/$split"
done
