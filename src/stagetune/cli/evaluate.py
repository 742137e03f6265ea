"""``stagetune evaluate MODEL_PT DATA_DIR``."""

from __future__ import annotations

import argparse
import json

from stagetune.cli._common import (
    add_global_options,
    add_threads_argument,
    check_output_file,
    set_threads,
    write_output_file,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="decode a data dir with a trained model and report its error rate",
        description="Decode DATA_DIR with MODEL_PT; print the token (CTC), frame or utterance "
        "error rate with substitutions, deletions and insertions, or a regression model's MSE "
        "and concordance correlation coefficient (CCC; multitask: every sub-task's figures).",
    )
    p.add_argument("model", metavar="MODEL_PT")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument(
        "--out", metavar="FILE",
        help="write hypotheses in Kaldi text format here; for regress the per-frame predictions, in "
        "the targets' units, as a binary Kaldi archive of one (output frames x D) matrix per utterance "
        "(copy-matrix ark:FILE); for multi the outputs of training.main_task, as that task writes them",
    )
    p.add_argument("--beam-width", type=int, default=0, metavar="N", help="CTC prefix beam search width (0: greedy)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    add_threads_argument(p)
    add_global_options(p, after_command=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    if args.beam_width < 0 or args.batch_size < 1:
        raise UsageError("--beam-width must be >= 0 and --batch-size >= 1")
    out = check_output_file(args.out, "--out", "hyp.txt") if args.out else None  # before decoding
    set_threads(args.threads)
    from stagetune.evaluate import evaluate_model
    from stagetune.training import resolve_device

    result = evaluate_model(
        args.model,
        args.data_dir,
        device=resolve_device(args.device),
        beam_width=args.beam_width,
        batch_size=args.batch_size,
        hypotheses=out is not None,
    )
    if out is not None and result.predictions is not None:
        from stagetune.evaluate import write_predictions

        write_predictions(out, result.predictions)
    elif out is not None:
        write_output_file(out, result.text())
    name = result.error_name
    score = result.score
    if score.figures:  # a task with its own figures (regression, multitask)
        if args.json:
            print(json.dumps({"metric": name, "rate": score.error, **score.figures}))
        else:
            print(f"{score.describe()} ({score.units}) on {score.counts.utterances} utterances of {args.data_dir}")
        return 0
    if args.json:
        print(json.dumps({"metric": name, "rate": result.counts.rate, **result.counts.as_dict()}))
    else:
        c = result.counts
        print(
            f"{name} {c.rate:.2%} (S={c.substitutions} D={c.deletions} I={c.insertions} "
            f"N={c.ref_length}) on {c.utterances} utterances of {args.data_dir}"
        )
    return 0
