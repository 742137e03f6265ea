"""``stagetune prep-fsdd [--tiny] OUT_DIR``: the FSDD connected-digit corpus, with features.

What ``scripts/prep_fsdd.sh`` runs (the script is a thin wrapper now): the
recordings of the Free Spoken Digit Dataset joined into connected-digit
utterances (:mod:`stagetune.fsdd`), then ``stagetune prep`` on every split.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

__all__ = ["add_parser", "run"]

_SOURCE = "https://github.com/Jakobovski/free-spoken-digit-dataset (its recordings/ dir)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prep-fsdd",
        help="build the FSDD connected-digit corpus (or --tiny, yesno-like) and compute its features",
        description="Join the FSDD recordings ({digit}_{speaker}_{index}.wav, 8 kHz) into connected-digit "
        "Kaldi data dirs OUT_DIR/{train,dev,test} split by speaker, then compute features, CMVN and "
        "tokens for each, as `stagetune prep` does. The result is CC BY-SA 4.0, like the recordings.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument(
        "--recordings", metavar="DIR", type=Path, default=None,
        help=f"the FSDD recordings (default: $FSDD_DIR); from {_SOURCE}",
    )
    p.add_argument(
        "--tiny", action="store_true",
        help="the tiny yesno-like corpus instead: 2 digits (ONE, SIX), 8 per utterance, "
        "31/10/29 utterances of one speaker each in train/dev/test",
    )
    p.add_argument(
        "--isolated", choices=("speakers", "digits", "verification"), default=None,
        help="the isolated recordings for utterance classification (task utt, classes in utt2class) "
        "instead: 'speakers' = speaker identification over all 6 speakers (test: takes 0-4 of each "
        "digit, FSDD's own split; dev: takes 5-9), 'digits' = digit recognition on unseen speakers "
        "(the connected corpus's speaker splits), 'verification' = a speaker model of the 4 training "
        "speakers and a test set of the 2 others with a trials list of all their pairs",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the dither (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError
    from stagetune.fsdd import build_fsdd_corpus, build_tiny_fsdd_corpus, report
    from stagetune.prep import prep_data_dir

    recordings = args.recordings
    if recordings is None:
        if not os.environ.get("FSDD_DIR"):
            raise UsageError(f"prep-fsdd needs the FSDD recordings: give --recordings DIR or set FSDD_DIR; from {_SOURCE}")
        recordings = Path(os.environ["FSDD_DIR"])
    if not recordings.is_dir():
        raise UsageError(f"--recordings {recordings}: no such directory; the FSDD recordings are at {_SOURCE}")
    started = time.monotonic()
    if args.isolated is not None:
        if args.tiny:
            raise UsageError("give --tiny or --isolated, not both")
        from stagetune.fsdd_isolated import build_isolated_fsdd

        out_dir = build_isolated_fsdd(recordings, args.out_dir, args.isolated)
    else:
        build = build_tiny_fsdd_corpus if args.tiny else build_fsdd_corpus
        out_dir = build(recordings, args.out_dir, seed=args.seed)
        report(out_dir, tiny=args.tiny, started=started)
    for split in ("train", "dev", "test"):
        if (out_dir / split / "wav.scp").is_file():
            print(prep_data_dir(out_dir / split, seed=args.seed).describe(), flush=True)
    return 0
