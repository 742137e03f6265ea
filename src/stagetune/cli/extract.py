"""``stagetune extract MODEL_PT DATA_DIR OUT`` and ``stagetune score-trials EMBEDDINGS TRIALS``."""

from __future__ import annotations

import argparse
from pathlib import Path

from stagetune.cli._common import add_global_options, add_threads_argument, check_output_file, set_threads

__all__ = ["add_parser", "run_extract", "run_score"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="write each utterance's embedding (or frame-level encoder states) for Kaldi tools",
        description="Run MODEL_PT over DATA_DIR (features only, normalised as in training) and write "
        "one vector per utterance (--level utterance: a task-utt model's embedding, else the mean "
        "encoder state) or the encoder states per output frame (--level frame). --format ark writes "
        "OUT.ark and OUT.scp (Kaldi's copy-vector/copy-matrix read them), txt a text archive, pt a "
        "torch.save dict of utterance id -> tensor.",
    )
    p.add_argument("model", metavar="MODEL_PT")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", dest="fmt", choices=("ark", "txt", "pt"), default="ark")
    p.add_argument("--level", choices=("utterance", "frame"), default="utterance")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    add_threads_argument(p)
    add_global_options(p, after_command=True)
    p.set_defaults(func=run_extract)

    s = sub.add_parser(
        "score-trials",
        help="speaker verification: cosine-score a trials list, print EER and minDCF",
        description="Score every trial of TRIALS (`1|0 UTT_A UTT_B` or `UTT_A UTT_B target|nontarget` "
        "lines) by the cosine similarity of the two utterances' embeddings (an .scp/.ark or text "
        "archive, or a .pt dict, as `stagetune extract` writes them); print the equal error rate and "
        "the normalised minimum detection cost.",
    )
    s.add_argument("embeddings", metavar="EMBEDDINGS")
    s.add_argument("trials", metavar="TRIALS")
    s.add_argument("--p-target", type=float, default=0.01, metavar="P", help="prior of a target trial for minDCF (default 0.01)")
    s.add_argument("--scores", metavar="FILE", help="also write `UTT_A UTT_B SCORE` per trial here")
    add_global_options(s, after_command=True)
    s.set_defaults(func=run_score)


def run_extract(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_file(args.out, "OUT", "embeddings.ark")
    set_threads(args.threads)
    from stagetune.extract import extract
    from stagetune.training import resolve_device

    written = extract(args.model, args.data_dir, args.out, fmt=args.fmt, level=args.level,
                      device=resolve_device(args.device), batch_size=args.batch_size)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _read_embeddings(path: str) -> dict:
    import numpy as np

    from stagetune.errors import DataError

    source = Path(path)
    if not source.is_file():
        raise DataError(f"{source}: embeddings file does not exist; write one with `stagetune extract`")
    if source.suffix == ".pt":
        import torch

        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file: one line, not a traceback
            raise DataError(f"{source}: not a stagetune embeddings file ({exc.__class__.__name__})") from None
        return {str(k): np.asarray(v) for k, v in loaded.items()}
    import kaldiio

    try:
        reader = kaldiio.load_scp(str(source)) if source.suffix == ".scp" else kaldiio.load_ark(str(source))
        return {str(k): np.asarray(v) for k, v in reader.items()}
    except Exception as exc:
        raise DataError(f"{source}: cannot read it as a Kaldi archive or scp ({exc})") from None


def run_score(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    if not 0 < args.p_target < 1:
        raise UsageError(f"--p-target must be in (0, 1), got {args.p_target}")
    out = check_output_file(args.scores, "--scores", "scores.txt") if args.scores else None
    from stagetune.verification import read_trials, score

    trials = read_trials(args.trials)
    result = score(_read_embeddings(args.embeddings), trials, p_target=args.p_target, where=args.embeddings)
    if out is not None:
        from stagetune.cli._common import write_output_file

        write_output_file(out, "".join(f"{t.enrol} {t.test} {s:.6f}\n" for t, s in zip(trials, result.scores)))
    print(result.text())
    return 0
