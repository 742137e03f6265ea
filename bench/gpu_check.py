"""Every CUDA path of stagetune on this machine's GPU, checked and timed in one table.

Rows (one table, printed at the end; each row says ok, FAIL, off-goal or skipped):

* (a) memory: for 8 architectures, the memory check's figure (what a trial's
  ``mem_bytes`` is: :func:`stagetune.optim.memory.measure_step`, CUDA peak of a
  synthetic step) against the peak of a real training step
  (:func:`stagetune.epoch.train_one_epoch` on a batch of the same shape, read
  with ``torch.cuda.max_memory_allocated``), and the meta-device estimate
  (:func:`stagetune.optim.estimate.estimate_step`) against both; goal: the
  estimate within 10% of both.  Float32 throughout (the estimate is of the
  float32 step); the check's figure with autocast is shown beside it.
* (b) autocast + GradScaler on and off: the same model trained on the demo
  corpus: throughput, finite losses, dev error (the same within noise).
* (c) ``optim run --workers 2 --gpus 0,0`` (and ``--gpus 0,1`` with two GPUs):
  each worker starts with the ``CUDA_VISIBLE_DEVICES`` it was given and its
  trial trains on CUDA.
* (d) stagetune's training loop against a bare PyTorch loop on the GPU
  (:mod:`train_throughput`'s bare loop; goal: ratio >= 0.9).
* (e) a real CUDA out-of-memory error (a trial too large for a per-process cap
  on GPU memory) pruned, with the reason stored.
* (f) one demo trial end to end on the GPU: ``optim init`` + ``optim run``
  through the CLI, COMPLETE, with its memory measured on CUDA.

Without CUDA it says so, runs the CPU counterparts of (a), (b) and (d) at a
small size (seconds: what the CI test runs) and reports the CUDA rows as
skipped.  Exit status 1 when a row FAILs (an off-goal figure is no failure).

Run: ``python bench/gpu_check.py`` (a few minutes on a GPU); ``--json FILE``
also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

from train_throughput import NO_AUGMENTATION, bare_epoch  # noqa: E402  (bench/train_throughput.py)

from stagetune.config import Config, load_config, with_values  # noqa: E402
from stagetune.dataset import Batch  # noqa: E402

FEAT_DIM = 40
NUM_OUTPUTS = 13  # output units (the demo corpus: 12 tokens and the blank)

#: name -> (config overrides, batch size, frames, target length) of the memory rows (a), on CUDA.
ARCHITECTURES: dict[str, tuple[dict[str, Any], int, int, int]] = {
    "1 conv + 1x BiGRU 96": ({"model.convolutional_layers": 1, "model.recurrent_layers": 1,
                              "model.recurrent_size": 96, "model.recurrent_type": "gru"}, 16, 400, 40),
    "2 conv + 2x BiGRU 128": ({"model.recurrent_type": "gru", "model.recurrent_size": 128}, 16, 600, 60),
    "2 conv + 2x BiLSTM 256": ({"model.recurrent_type": "lstm", "model.recurrent_size": 256}, 16, 600, 60),
    "2 conv + 3x BiLSTM 384": ({"model.recurrent_type": "lstm", "model.recurrent_size": 384,
                                "model.recurrent_layers": 3}, 16, 800, 80),
    "3 conv + 3x BiGRU 256, frame": ({"model.convolutional_layers": 3, "model.recurrent_type": "gru",
                                      "model.recurrent_size": 256, "model.recurrent_layers": 3,
                                      "model.task": "frame"}, 16, 800, 0),
    "4 conv + 2x BiLSTM 512": ({"model.convolutional_layers": 4, "model.recurrent_type": "lstm",
                                "model.recurrent_size": 512}, 32, 800, 80),
    "2 conv + 4x BiGRU 768": ({"model.recurrent_type": "gru", "model.recurrent_size": 768,
                               "model.recurrent_layers": 4}, 32, 1000, 100),
    "3 conv only (no recurrent layer)": ({"model.convolutional_layers": 3, "model.recurrent_layers": 0},
                                         32, 1000, 100),
}
#: The CPU run (no CUDA): two small architectures at a small size, so it takes seconds.
CPU_ARCHITECTURES = ("1 conv + 1x BiGRU 96", "3 conv only (no recurrent layer)")
CPU_SIZE = (2, 120, 12)


@dataclass
class Row:
    check: str
    case: str
    result: str
    goal: str = ""
    status: str = "ok"  # ok, FAIL, off-goal, skipped
    seconds: float = 0.0  # since the row before


ROWS: list[Row] = []
_LAST = [time.perf_counter()]


def add(check: str, case: str, result: str, goal: str = "", status: str = "ok") -> None:
    now = time.perf_counter()
    ROWS.append(Row(check, case, result, goal, status, round(now - _LAST[0], 2)))
    _LAST[0] = now
    print(f"  {check} {case}: {status}: {result} ({ROWS[-1].seconds:.1f} s)", flush=True)


def guarded(check: str, case: str, fn: Callable[[], None]) -> None:
    """Run one check; an unexpected error is its FAIL row, not the end of the script."""
    try:
        fn()
    except Exception as exc:  # a broken check must not hide the others
        first = (str(exc).splitlines() or [""])[0][:160]
        add(check, case, f"{type(exc).__name__}: {first}", status="FAIL")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# (a) memory ---------------------------------------------------------------


def _config(overrides: dict[str, Any], autocast: bool = False) -> Config:
    # dropout off: the synthetic step and the real one draw no masks differently
    return with_values(load_config(), {**overrides, "training.autocast": autocast, "training.dropout_prob": 0.0,
                                       "training.num_time_mask": 0, "training.num_freq_mask": 0,
                                       "training.noise_eps": 0.0})


def _batch(config: Config, batch_size: int, frames: int, target_len: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch_size, frames, FEAT_DIM, generator=gen)
    feat_lens = torch.full((batch_size,), frames, dtype=torch.long)
    if config.model.task == "frame":
        targets = torch.randint(0, NUM_OUTPUTS, (batch_size, frames), generator=gen)
        target_lens = feat_lens.clone()
    else:
        targets = torch.randint(1, NUM_OUTPUTS, (batch_size, target_len), generator=gen)
        target_lens = torch.full((batch_size,), target_len, dtype=torch.long)
    return Batch(feats, feat_lens, targets, target_lens, [f"u{i}" for i in range(batch_size)])


def _real_step(config: Config, batch: Batch, device: torch.device, steps: int = 2) -> None:
    """``steps`` real training steps of stagetune's loop (model and optimizer built here)."""
    from stagetune.epoch import train_one_epoch
    from stagetune.model import build_model
    from stagetune.training import make_optimizer

    with torch.device(device):
        model = build_model(config, FEAT_DIM, NUM_OUTPUTS)  # as the check's synthetic step
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and config.training.autocast else None
    for step in range(steps):
        train_one_epoch(model, [batch], optimizer, config, epoch=step + 1, device=device, scaler=scaler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_peak_bytes(config: Config, batch: Batch, device: torch.device) -> int:
    """Peak bytes of real training steps: CUDA's ``max_memory_allocated``, or c10's CPU allocator."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _real_step(config, batch, device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        torch.cuda.empty_cache()
        return peak
    from stagetune.optim.memory import allocator_peak_bytes

    return allocator_peak_bytes(lambda: _real_step(config, batch, device))


def check_memory(device: torch.device) -> None:
    from stagetune.optim.estimate import estimate_step
    from stagetune.optim.memory import measure_step

    cuda = device.type == "cuda"
    names = list(ARCHITECTURES) if cuda else list(CPU_ARCHITECTURES)
    for name in names:
        overrides, *size = ARCHITECTURES[name]
        batch_size, frames, target_len = size if cuda else CPU_SIZE
        if overrides.get("model.task") == "frame":
            target_len = 0
        sizes = dict(batch_size=batch_size, max_frames=frames, max_target_len=target_len)
        case = f"{name}, {batch_size}x{frames}" + ("" if cuda else " (CPU: tracker vs allocator)")

        def one(name: str = name, overrides: dict[str, Any] = overrides, sizes: dict[str, int] = sizes,
                case: str = case) -> None:
            config = _config(overrides)
            check = measure_step(config, FEAT_DIM, NUM_OUTPUTS, device=device, **sizes).bytes
            real = real_peak_bytes(config, _batch(config, sizes["batch_size"], sizes["max_frames"],
                                                  sizes["max_target_len"]), device)
            estimate = estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device=device.type, **sizes).bytes
            amp = ""
            if cuda:
                amp_bytes = measure_step(_config(overrides, autocast=True), FEAT_DIM, NUM_OUTPUTS,
                                         device=device, **sizes).bytes
                amp = f"; check with autocast {_mb(amp_bytes)}"
            e_check, e_real = estimate / check, estimate / real
            met = abs(e_check - 1) <= 0.10 and abs(e_real - 1) <= 0.10
            add("(a) memory", case,
                f"check {_mb(check)}, real step {_mb(real)} (check/real {check / real:.3f}); "
                f"estimate {_mb(estimate)} (est/check {e_check:.3f}, est/real {e_real:.3f}){amp}",
                "estimate within 10% of both", "ok" if met else "off-goal")

        guarded("(a) memory", case, one)
    if not cuda:
        add("(a) memory", f"{len(ARCHITECTURES)} architectures on CUDA (max_memory_allocated)", "no CUDA device",
            status="skipped")


# demo corpus ----------------------------------------------------------------


def demo_corpus(root: Path, cuda: bool) -> Path:
    from stagetune.demo import make_demo_corpus

    sizes = dict(num_train=240, num_dev=40, num_test=0) if cuda else dict(num_train=8, num_dev=2, num_test=0)
    return make_demo_corpus(root / "demo", variant="easy", **sizes)


# (b) autocast ---------------------------------------------------------------


def check_autocast(device: torch.device, corpus: Path, work: Path) -> None:
    from stagetune.corpus import load_corpus
    from stagetune.training import fit

    cuda = device.type == "cuda"
    epochs = 6 if cuda else 1
    data = load_corpus(corpus / "train", corpus / "dev")
    results: dict[bool, tuple[float, float]] = {}
    for autocast in (True, False):
        case = f"autocast {'on + GradScaler' if autocast else 'off'}, {epochs} epochs of the demo corpus"
        if autocast and not cuda:
            add("(b) autocast", case, "autocast is CUDA only (training.autocast)", status="skipped")
            continue

        def one(autocast: bool = autocast, case: str = case) -> None:
            config = with_values(load_config(), {"training.autocast": autocast, "training.num_epochs": epochs,
                                                 "training.early_stopping_threshold": 0.0})
            torch.manual_seed(0)
            started = time.perf_counter()
            result = fit(config, data, work / f"amp-{autocast}", device=device, quiet=True)
            seconds = time.perf_counter() - started
            losses = [float(h["train_loss"]) for h in result.history]
            fps = statistics.median(float(h["frames_per_second"]) for h in result.history)
            finite = all(math.isfinite(x) for x in losses)
            results[autocast] = (result.best_dev_error, fps)
            add("(b) autocast", case,
                f"{fps:.0f} frames/s (median epoch), {seconds:.1f} s; train loss {losses[0]:.3g} -> "
                f"{losses[-1]:.3g}; best dev error {result.best_dev_error:.2%}",
                "finite loss", "ok" if finite else "FAIL")

        guarded("(b) autocast", case, one)
    if True in results and False in results:
        (on_err, on_fps), (off_err, off_fps) = results[True], results[False]
        same = abs(on_err - off_err) <= 0.05
        add("(b) autocast", "on vs off", f"speed-up {on_fps / off_fps:.2f}x; dev error {on_err:.2%} vs {off_err:.2%}",
            "dev errors within 5 points", "ok" if same else "off-goal")


# (c) --gpus -----------------------------------------------------------------


def _cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stagetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _init_study(url: str, name: str, corpus: Path, cwd: Path, *extra: str, device: str = "cuda",
                mem_limit: int | None = 10**13) -> None:
    """A study of 2 one-epoch trials tuning the learning rate; a memory limit no trial meets
    (so each trial's memory is measured, on the device it trains on)."""
    limit = ["--mem-limit-bytes", str(mem_limit)] if mem_limit is not None else []
    done = _cli(["--device", device, "--set", "training.num_epochs=1", *extra, "optim", "--study-name", name, url,
                 "init", str(corpus / "train"), "--dev-dir", str(corpus / "dev"), "--whitelist",
                 "training.learning_rate", "--num-trials", "2", "--pruner", "none", "--enqueue-base", *limit], cwd)
    if done.returncode != 0:
        raise RuntimeError(f"optim init: {done.stderr.strip()[-300:]}")


def _trials(url: str, name: str) -> list[Any]:
    from stagetune.optim.storage import storage_session
    import optuna

    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)


def check_gpus(corpus: Path, work: Path) -> None:
    count = torch.cuda.device_count()
    for gpus in ("0,0", "0,1"):
        case = f"optim run --workers 2 --gpus {gpus}"
        if len(set(gpus.split(","))) > count:
            add("(c) --gpus", case, f"{count} GPU(s) here", status="skipped")
            continue

        def one(gpus: str = gpus, case: str = case) -> None:
            url = f"sqlite:///{work / 'gpus.db'}"
            name = "gpus-" + gpus.replace(",", "")
            _init_study(url, name, corpus, work)
            done = _cli(["optim", "--study-name", name, url, "run", "--workers", "2", "--gpus", gpus,
                         "--ckpt-dir", str(work / "ckpt")], work)
            seen = dict(re.findall(r"\[w(\d)\] worker \d+ .*CUDA_VISIBLE_DEVICES=(\S+)", done.stderr))
            wanted = dict(enumerate(gpus.split(",")))
            trials = _trials(url, name)
            methods = sorted({str(t.user_attrs.get("mem_method")) for t in trials})
            states = sorted(t.state.name for t in trials)
            ok = done.returncode == 0 and {int(k): v for k, v in seen.items()} == wanted and states == ["COMPLETE"] * 2
            add("(c) --gpus", case,
                f"workers saw CUDA_VISIBLE_DEVICES {','.join(seen.get(str(i), '?') for i in range(2))}; "
                f"trials {', '.join(states)}; memory measured by {', '.join(methods)}"
                + ("" if done.returncode == 0 else f"; exit {done.returncode}: {done.stderr.strip()[-200:]}"),
                "each worker on the GPU it was given", "ok" if ok else "FAIL")

        guarded("(c) --gpus", case, one)


# (d) loop overhead ----------------------------------------------------------


def check_loop(device: torch.device, corpus: Path) -> None:
    from stagetune.dataset import BucketBatchSampler, UtteranceDataset, collate
    from stagetune.epoch import train_one_epoch
    from stagetune.kaldi import load_data_dir
    from stagetune.model import build_model
    from stagetune.tasks import TASKS
    from stagetune.normalize import fit_normalizer
    from stagetune.schedule import LearningRateSchedule
    from stagetune.training import make_optimizer

    cuda = device.type == "cuda"
    repeats, max_batches = (5, 40) if cuda else (1, 3)
    data = load_data_dir(corpus / "train")
    config = load_config(["@demo"], NO_AUGMENTATION)
    normalizer = fit_normalizer(config.data.normalization, data, data.utt_ids)
    dataset = UtteranceDataset(data, data.utt_ids, normalizer=normalizer)
    sampler = BucketBatchSampler(dataset.lengths, config.data.batch_size, shuffle=True, seed=0)
    sampler.set_epoch(1)
    batches = [collate([dataset[i] for i in b]) for b in sampler.batches()[:max_batches]]
    frames = int(sum(int(b.feat_lens.sum()) for b in batches))
    torch.manual_seed(config.training.seed)
    initial = build_model(config, data.feat_dim, TASKS[config.model.task].num_outputs(len(data.tokens.symbols)))
    models = {"stagetune": initial.to(device), "bare": copy.deepcopy(initial).to(device)}
    optimizers = {name: make_optimizer(m, config) for name, m in models.items()}
    schedule = LearningRateSchedule(optimizers["stagetune"], config.training)
    # the bare loop gets its batches on the device already (stagetune's loop moves each one itself)
    on_device = [Batch(b.feats.to(device), b.feat_lens.to(device), b.targets.to(device), b.target_lens.to(device),
                       b.utt_ids) for b in batches]

    def run(name: str, epoch: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if name == "stagetune":
            train_one_epoch(models[name], batches, optimizers[name], config, epoch=epoch, device=device,
                            schedule=schedule)
        else:
            bare_epoch(models[name], on_device, optimizers[name], config.training.clip_grad_norm)
        if cuda:
            torch.cuda.synchronize(device)
        return frames / (time.perf_counter() - start)

    for name in models:
        run(name, 0)  # warm-up: kernels, allocator
    fps: dict[str, list[float]] = {"stagetune": [], "bare": []}
    for rep in range(repeats):
        for name in (("stagetune", "bare") if rep % 2 == 0 else ("bare", "stagetune")):
            fps[name].append(run(name, rep + 1))
    ours, bare = statistics.median(fps["stagetune"]), statistics.median(fps["bare"])
    ratio = ours / bare
    add("(d) loop", f"stagetune vs bare PyTorch on {device.type}, {len(batches)} batches x {repeats}",
        f"{ours:.0f} vs {bare:.0f} frames/s: ratio {ratio:.3f}" + ("" if cuda else " (CPU, tiny: a smoke test)"),
        "ratio >= 0.9", "ok" if ratio >= 0.9 or not cuda else "off-goal")


# (e) out of memory ----------------------------------------------------------


def check_oom(device: torch.device, corpus: Path, work: Path) -> None:
    from stagetune.optim.worker import WorkerOptions, run_worker

    url = f"sqlite:///{work / 'oom.db'}"
    # ~100 M float32 weights (400 MB, three times that with Adam) under a 300 MB cap
    big = ["--set", "model.recurrent_type=lstm", "--set", "model.recurrent_size=1024",
           "--set", "model.recurrent_layers=4"]
    _init_study(url, "oom", corpus, work, *big, mem_limit=None)  # the OOM comes in training
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()  # the cap counts what the caching allocator holds
    torch.cuda.set_per_process_memory_fraction(300e6 / total, device)
    try:
        run_worker(url, "oom", WorkerOptions(n_trials=1, ckpt_dir=work / "ckpt", device="cuda"), log=lambda _: None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    trial = _trials(url, "oom")[0]
    reason = str(trial.user_attrs.get("prune_reason", trial.user_attrs.get("fail_reason", "-")))
    ok = trial.state.name == "PRUNED" and "out of memory" in reason
    add("(e) OOM", "4x BiLSTM 1024 under a 300 MB cap", f"trial {trial.state.name}: {reason[:150]}",
        "pruned, reason stored", "ok" if ok else "FAIL")


# (f) demo trial -------------------------------------------------------------


def check_demo_trial(corpus: Path, work: Path) -> None:
    url = f"sqlite:///{work / 'demo.db'}"
    _init_study(url, "demo", corpus, work, "--read-ini", "@demo")
    started = time.perf_counter()
    done = _cli(["optim", "--study-name", "demo", url, "run", "--n-trials", "1", "--ckpt-dir", str(work / "ckpt")],
                work)
    seconds = time.perf_counter() - started
    trial = _trials(url, "demo")[0]
    method = trial.user_attrs.get("mem_method")
    ok = done.returncode == 0 and trial.state.name == "COMPLETE"
    add("(f) demo trial", "optim init + run on cuda (@demo config, 1 epoch)",
        f"trial {trial.state.name}, value {trial.value}, memory by {method} "
        f"({_mb(float(trial.user_attrs.get('mem_bytes', 0)))}), {seconds:.1f} s"
        + ("" if done.returncode == 0 else f"; exit {done.returncode}: {done.stderr.strip()[-200:]}"),
        "COMPLETE on the GPU", "ok" if ok else "FAIL")


# the table -------------------------------------------------------------------


def print_table(header: str) -> None:
    widths = [max(len(getattr(r, f)) for r in ROWS + [Row("check", "case", "result", "goal", "status")])
              for f in ("check", "case", "status")]
    print()
    print(header)
    print(f"{'check':<{widths[0]}}  {'case':<{widths[1]}}  {'status':<{widths[2]}}  result [goal]")
    for r in ROWS:
        goal = f" [{r.goal}]" if r.goal else ""
        print(f"{r.check:<{widths[0]}}  {r.case:<{widths[1]}}  {r.status:<{widths[2]}}  {r.result}{goal}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
        header = (f"gpu_check: {name}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB, "
                  f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        torch.set_num_threads(1)
        header = (f"gpu_check: no CUDA device (torch {torch.__version__}, {platform.machine()}): the CPU rows "
                  f"at a small size, the CUDA rows skipped")
    print(header, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        guarded("(a) memory", "all", lambda: check_memory(device))
        corpus = demo_corpus(work, cuda)
        guarded("(b) autocast", "all", lambda: check_autocast(device, corpus, work))
        if cuda:
            guarded("(c) --gpus", "all", lambda: check_gpus(corpus, work))
        else:
            add("(c) --gpus", "optim run --workers 2 --gpus 0,0 and 0,1", "no CUDA device", status="skipped")
        guarded("(d) loop", "all", lambda: check_loop(device, corpus))
        if cuda:
            guarded("(e) OOM", "all", lambda: check_oom(device, corpus, work))
            guarded("(f) demo trial", "all", lambda: check_demo_trial(corpus, work))
        else:
            add("(e) OOM", "a real CUDA out-of-memory error, pruned", "no CUDA device", status="skipped")
            add("(f) demo trial", "one demo trial on the GPU", "no CUDA device", status="skipped")
    print_table(header + f"; {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in ROWS]}, indent=1) + "\n")
    return 1 if any(r.status == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
