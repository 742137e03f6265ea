"""``stagetune prep DATA_DIR``: features, CMVN stats and tokens for a Kaldi data dir."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stagetune.cli._common import add_global_options

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``prep`` command on the top-level sub-parsers.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The ``prep`` sub-parser.
    """
    parser = subparsers.add_parser(
        "prep",
        help="compute log-mel features, CMVN stats and tokens.txt for a Kaldi data dir",
        description=(
            "Read DATA_DIR/wav.scp (and text, utt2spk when present) and write feats.scp/ark, "
            "utt2num_frames, utt2dur, per-speaker cmvn.scp/ark, spk2utt, utt2spk when "
            "absent and tokens.txt from text when absent, like Kaldi's make_fbank.sh. "
            "Nothing is replaced unless every utterance succeeds."
        ),
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", type=Path, help="Kaldi data directory")
    parser.add_argument(
        "--num-mel-bins", type=int, default=40, help="mel bins per frame (default: 40)"
    )
    parser.add_argument(
        "--dither",
        type=float,
        default=1.0,
        help="std of Gaussian noise on the int16 scale, seeded; 0 turns it off (default: 1.0)",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=None,
        metavar="HZ",
        help="require this sample rate (default: whatever rate all wavs share)",
    )
    parser.add_argument(
        "--frame-length-ms", type=float, default=25.0, help="window length (default: 25)"
    )
    parser.add_argument(
        "--frame-shift-ms", type=float, default=10.0, help="window shift (default: 10)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the dither noise (default: 0)")
    parser.add_argument(
        "--compress", action="store_true", help="write Kaldi-compressed (lossy) feature matrices"
    )
    add_global_options(parser, after_command=True)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``prep`` and print its one-line summary; returns the exit code."""
    from stagetune.prep import prep_data_dir

    summary = prep_data_dir(
        args.data_dir,
        num_mel_bins=args.num_mel_bins,
        dither=args.dither,
        sample_rate=args.sample_rate,
        frame_length_ms=args.frame_length_ms,
        frame_shift_ms=args.frame_shift_ms,
        seed=args.seed,
        compress=args.compress,
    )
    print(summary.describe())
    return 0
