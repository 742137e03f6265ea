"""Training-loop throughput of stagetune versus a bare PyTorch loop, side by side.

Both sides train the same model class (``conf/demo.ini``, built by
:func:`stagetune.model.build_model` from the same initial weights) with the same
optimizer on the same pre-built, padded batches of the demo corpus, so only the
loop differs:

* ``stagetune``: :func:`stagetune.training.train_one_epoch` as ``fit`` calls it
  (per-batch reseeding from ``(seed, epoch, batch)``, device move, autocast
  context, task loss, gradient clipping, the learning-rate schedule's per-update
  step, loss and frame bookkeeping, stop check);
* ``bare``: ``zero_grad``, forward, ``log_softmax`` + ``F.ctc_loss``,
  ``backward``, ``clip_grad_norm_``, ``step`` and nothing else.

Augmentation is off on both sides (its cost is the feature, not overhead).
Runs alternate A B, B A, ... (the machine is shared and noisy) and medians of
frames per second are reported, by wall-clock and by process CPU time (less
disturbed by other processes on a shared machine), with their ratios (target
>= 0.9).  Also
printed: the padding fraction of stagetune's length-bucketed batches versus
random batches of the same size (target <= 10%).

Run: ``.venv/bin/python bench/train_throughput.py`` (about a minute on 1
thread; ``--corpus DIR`` reuses a prepared demo train dir instead of writing a
fresh one).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stagetune.config import load_config
from stagetune.dataset import Batch, BucketBatchSampler, UtteranceDataset, collate
from stagetune.demo import make_demo_corpus
from stagetune.kaldi import load_data_dir
from stagetune.model import AcousticModel, build_model
from stagetune.tasks import TASKS
from stagetune.normalize import fit_normalizer
from stagetune.schedule import LearningRateSchedule
from stagetune.training import make_optimizer, train_one_epoch

DEMO_INI = Path(__file__).resolve().parents[1] / "conf" / "demo.ini"
NO_AUGMENTATION = ("training.num_time_mask=0", "training.num_freq_mask=0", "training.noise_eps=0.0")


def bare_epoch(
    model: AcousticModel, batches: list[Batch], optimizer: torch.optim.Optimizer, clip: float
) -> None:
    """The plain PyTorch loop: what every CTC recipe does per batch."""
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        logits, out_lens = model(batch.feats, batch.feat_lens)
        log_probs = logits.log_softmax(-1).transpose(0, 1)
        loss = F.ctc_loss(
            log_probs,
            batch.targets[batch.targets >= 0],
            out_lens,
            batch.target_lens,
            zero_infinity=True,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def padding_fraction(lengths: np.ndarray, batches: list[list[int]]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - int(lengths.sum()) / padded


def random_batches(num_items: int, batch_size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(num_items)
    return [order[i : i + batch_size].tolist() for i in range(0, num_items, batch_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="prepared demo train dir (default: write one)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per side (default 5)")
    parser.add_argument("--max-batches", type=int, default=40, help="batches per timed epoch (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))

    if args.corpus is not None:
        return measure(args.corpus, args)
    with tempfile.TemporaryDirectory() as tmp:
        return measure(make_demo_corpus(Path(tmp) / "demo", num_dev=0, num_test=0, variant="easy") / "train", args)


def measure(train_dir: Path, args: argparse.Namespace) -> int:
    """Print the padding fractions and the interleaved timings."""
    data = load_data_dir(train_dir)
    config = load_config([DEMO_INI], NO_AUGMENTATION)
    normalizer = fit_normalizer(config.data.normalization, data, data.utt_ids)
    dataset = UtteranceDataset(data, data.utt_ids, normalizer=normalizer)
    lengths = np.asarray(dataset.lengths)
    bs = config.data.batch_size
    sampler = BucketBatchSampler(
        dataset.lengths, bs, shuffle=True, seed=0, jitter=config.data.length_jitter
    )
    bucketed, randomised = [], []
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        bucketed.append(sampler.padding_fraction())
        randomised.append(padding_fraction(lengths, random_batches(len(lengths), bs, epoch)))
    sampler.set_epoch(1)
    batches = [collate([dataset[i] for i in b]) for b in sampler.batches()[: args.max_batches]]
    frames = int(sum(int(b.feat_lens.sum()) for b in batches))

    task = TASKS[config.model.task]
    torch.manual_seed(config.training.seed)
    initial = build_model(config, data.feat_dim, task.num_outputs(len(data.tokens.symbols)))
    models = {"stagetune": initial, "bare": copy.deepcopy(initial)}
    optimizers = {name: make_optimizer(m, config) for name, m in models.items()}
    device = torch.device("cpu")
    clip = config.training.clip_grad_norm
    schedule = LearningRateSchedule(optimizers["stagetune"], config.training)  # one lr write per update

    def run(name: str, epoch: int) -> tuple[float, float]:
        """(wall-clock, CPU-time) frames per second of one pass over the batches."""
        wall, cpu = time.perf_counter(), time.process_time()
        if name == "stagetune":
            train_one_epoch(
                models[name], batches, optimizers[name], config, epoch=epoch, device=device,
                schedule=schedule,
            )
        else:
            bare_epoch(models[name], batches, optimizers[name], clip)
        return frames / (time.perf_counter() - wall), frames / (time.process_time() - cpu)

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}; "
        f"{len(dataset)} utterances in {train_dir}; model {sum(p.numel() for p in initial.parameters())} "
        f"parameters ({config.model.convolutional_layers} conv, {config.model.recurrent_layers}x "
        f"{config.model.recurrent_type} {config.model.recurrent_size}); {len(batches)} batches of "
        f"{bs}, {frames} frames per timed epoch"
    )
    for name in models:  # warm-up: allocator, oneDNN primitives
        run(name, 0)
    fps: dict[str, list[tuple[float, float]]] = {"stagetune": [], "bare": []}
    print("rep  frames/s by wall clock: stagetune / bare = ratio;  by CPU time: stagetune / bare = ratio")
    for rep in range(args.repeats):
        order = ("stagetune", "bare") if rep % 2 == 0 else ("bare", "stagetune")
        for name in order:
            fps[name].append(run(name, rep + 1))
        (ow, oc), (bw, bc) = fps["stagetune"][-1], fps["bare"][-1]
        print(f"{rep + 1:>3}  {ow:6.0f} / {bw:6.0f} = {ow / bw:.3f};  {oc:6.0f} / {bc:6.0f} = {oc / bc:.3f}")
    for clock, k in (("wall-clock", 0), ("CPU-time", 1)):
        ours = statistics.median(f[k] for f in fps["stagetune"])
        bare = statistics.median(f[k] for f in fps["bare"])
        print(
            f"median {clock} frames/s: stagetune {ours:.0f}, bare PyTorch {bare:.0f}; "
            f"ratio {ours / bare:.3f} (target >= 0.9)"
        )
    print(
        f"padding fraction over 5 epochs: bucketed {statistics.mean(bucketed):.1%} "
        f"(max {max(bucketed):.1%}, target <= 10%) vs random batches {statistics.mean(randomised):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
