"""``stagetune train TRAIN_DIR [DEV_DIR] MODEL_DIR``."""

from __future__ import annotations

import argparse
import sys

from stagetune.cli._common import add_global_options, add_threads_argument, non_negative_int, set_threads

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an acoustic model (resumes from MODEL_DIR's checkpoint when rerun)",
        description="Train an acoustic model on a Kaldi data dir with the configuration from "
        "--read-ini/--set. Rerunning the same command resumes from the last checkpoint.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="TRAIN_DIR [DEV_DIR] MODEL_DIR")
    p.add_argument(
        "--dev-proportion",
        type=float,
        default=None,
        metavar="P",
        help="without DEV_DIR: hold out this proportion of TRAIN_DIR (by utterance id; default 0.1)",
    )
    p.add_argument(
        "--extra-dev", action="append", default=[], metavar="DIR",
        help="another dev dir, scored every epoch (history.csv columns dev_error:NAME, dev_loss:NAME) "
        "but never used for model selection, the schedule or early stopping; repeat for more",
    )
    p.add_argument("--init-from", metavar="MODEL_PT", help="initialise from another model's weights")
    p.add_argument(
        "--adapt-from", metavar="BASE_PT",
        help="adapt a base model (same task, features and output symbols) to this data: initialise "
        "from it as --init-from does, and with training.adapt_rho > 0 keep the outputs close to its "
        "(loss = (1 - rho) x task loss + rho x KL(base || model), MSE for regression)",
    )
    p.add_argument("--num-data-workers", type=non_negative_int, default=0, metavar="N", help="DataLoader workers")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="per-epoch scalars for TensorBoard in DIR (extra: tensorboard)")
    add_threads_argument(p)
    add_global_options(p, after_command=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagetune.config import load_config
    from stagetune.errors import UsageError

    if len(args.dirs) not in (2, 3):
        raise UsageError(f"train takes TRAIN_DIR [DEV_DIR] MODEL_DIR, got {len(args.dirs)} paths")
    if len(args.dirs) == 3 and args.dev_proportion is not None:
        raise UsageError("give DEV_DIR or --dev-proportion, not both")
    if args.init_from and args.adapt_from:
        raise UsageError("give --init-from or --adapt-from, not both (--adapt-from initialises from the base too)")
    config = load_config(args.read_ini, args.overrides)
    if config.training.adapt_rho > 0 and not args.adapt_from:
        raise UsageError(
            f"training.adapt_rho = {config.training.adapt_rho:g} needs a base model: give --adapt-from BASE_PT"
        )
    board = []
    if args.tensorboard:
        from stagetune.optim.tensorboard import EpochWriter, require_tensorboard

        require_tensorboard()
        board = [EpochWriter(args.tensorboard)]
    set_threads(args.threads)
    from stagetune.corpus import load_corpus
    from stagetune.training import check_model_dir, fit, resolve_device

    train_dir, *dev, model_dir = args.dirs
    check_model_dir(model_dir)  # before reading any data: a forgotten MODEL_DIR is common
    device = resolve_device(args.device)
    corpus = load_corpus(
        train_dir, dev[0] if dev else None, dev_proportion=args.dev_proportion, task=config.model.task,
        extra_dev=args.extra_dev,
    )
    result = fit(
        config,
        corpus,
        model_dir,
        device=device,
        num_workers=args.num_data_workers,
        init_from=args.init_from,
        adapt_from=args.adapt_from,
        quiet=args.quiet,
        callbacks=board,
    )
    for writer in board:
        writer.close()
    print(
        f"best dev error {result.best_dev_error:.2%} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs{', stopped early' if result.stopped_early else ''}); "
        f"model: {result.model_path}"
    )
    sys.stdout.flush()
    return 0
