"""Adaptation to a new speaker: plain fine-tuning (``--init-from``) versus ``--adapt-from``.

Isolated FSDD digits, utterance classification (``model.task = utt``), built by
``stagetune prep-fsdd --isolated digits`` (train: george, jackson, nicolas,
yweweler; dev: theo).  Derived Kaldi dirs (same ``feats.ark``, subsets of the
listing files) are written under ``WORK``:

* ``base-train``: the four speakers' takes 10-49 of each digit (1600 utterances);
* ``base-dev``: their takes 5-9 (200), the base model's dev set;
* ``old-test``: their takes 0-4 (200), the "old speakers" held out from everything;
* ``theo-adapt``: theo's takes 5-9 (50 utterances, five of each digit), the adaptation data;
* ``theo-dev``: theo's takes 10-19 (100), the adapted models' dev set (best epoch);
* ``theo-test``: theo's takes 0-4 and 20-49 (350).

The base model trains on ``base-train`` for ``--base-epochs``; each adapted
model starts from it and trains on ``theo-adapt`` for ``--adapt-epochs``:
``--init-from`` (plain fine-tuning) and ``--adapt-from`` with each ``adapt_rho``
of ``--rhos``.  Every model is then scored with ``stagetune evaluate`` on
``old-test`` and ``theo-test``; the table gives utterance error rates.
Rerunning reuses finished models (``train`` on a finished model dir does nothing).

Run: ``.venv/bin/python bench/adaptation.py [--work /work/exp/adapt]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from stagetune.checkpoint import load_model_file

STAGETUNE = (sys.executable, "-m", "stagetune")
#: Files copied line by line (those of the subset's utterances or speakers).
UTT_FILES = ("feats.scp", "utt2class", "utt2spk", "text", "utt2num_frames", "utt2dur")
SPEAKERS = ("george", "jackson", "nicolas", "yweweler")


def _take(utt: str) -> int:
    return int(utt.rsplit("-", 1)[1])


def write_subset(source: Path, target: Path, keep) -> int:
    """A Kaldi dir of ``source``'s utterances for which ``keep(utt)`` holds (same feats)."""
    utts = [line.split()[0] for line in (source / "feats.scp").read_text().splitlines() if line.strip()]
    chosen = {u for u in utts if keep(u)}
    target.mkdir(parents=True, exist_ok=True)
    for name in UTT_FILES:
        if (source / name).exists():
            lines = [l for l in (source / name).read_text().splitlines() if l.split() and l.split()[0] in chosen]
            (target / name).write_text("".join(l + "\n" for l in lines))
    spk2utt: dict[str, list[str]] = {}
    for line in (target / "utt2spk").read_text().splitlines():
        utt, spk = line.split()
        spk2utt.setdefault(spk, []).append(utt)
    (target / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in spk2utt.items()))
    cmvn = [l for l in (source / "cmvn.scp").read_text().splitlines() if l.split() and l.split()[0] in spk2utt]
    (target / "cmvn.scp").write_text("".join(l + "\n" for l in cmvn))
    if (source / "tokens.txt").exists():
        (target / "tokens.txt").write_text((source / "tokens.txt").read_text())
    return len(chosen)


def run(*args: str) -> str:
    proc = subprocess.run([*STAGETUNE, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"stagetune {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def train(train_dir: Path, dev_dir: Path, model_dir: Path, epochs: int, *extra: str) -> float:
    started = time.perf_counter()
    run("train", str(train_dir), str(dev_dir), str(model_dir), "--quiet", "--threads", "1",
        "--set", "model.task=utt", "--set", f"training.num_epochs={epochs}", *extra)
    return time.perf_counter() - started


def error(model: Path, data: Path) -> float:
    return json.loads(run("evaluate", str(model / "model.pt"), str(data), "--json", "--threads", "1"))["rate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/data/fsdd-digits"),
                        help="the output of `stagetune prep-fsdd --isolated digits`")
    parser.add_argument("--work", type=Path, default=Path("/work/exp/adapt"))
    parser.add_argument("--base-epochs", type=int, default=8)
    parser.add_argument("--adapt-epochs", type=int, default=6)
    parser.add_argument("--adapt-lr", type=float, default=4e-3, help="training.learning_rate when adapting")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--stage", choices=("base", "all"), default="all", help="base: stop after the base model")
    args = parser.parse_args()
    work, data = args.work, args.data
    sets = {
        "base-train": (data / "train", lambda u: _take(u) >= 10),
        "base-dev": (data / "train", lambda u: 5 <= _take(u) < 10),
        "old-test": (data / "train", lambda u: _take(u) < 5),
        "theo-adapt": (data / "dev", lambda u: 5 <= _take(u) < 10),
        "theo-dev": (data / "dev", lambda u: 10 <= _take(u) < 20),
        "theo-test": (data / "dev", lambda u: _take(u) < 5 or _take(u) >= 20),
    }
    dirs = {}
    for name, (source, keep) in sets.items():
        dirs[name] = work / "data" / name
        n = write_subset(source, dirs[name], keep)
        print(f"{name}: {n} utterances", file=sys.stderr)
    base = work / "base"
    seconds = train(dirs["base-train"], dirs["base-dev"], base, args.base_epochs)
    print(f"base: {seconds:.0f} s", file=sys.stderr)
    if args.stage == "base":
        return
    base_pt = str(base / "model.pt")
    adapt = ("--set", f"training.learning_rate={args.adapt_lr}", "--set", "training.warmup_updates=0",
             "--extra-dev", str(dirs["base-dev"]))
    runs: list[tuple[str, Path]] = [("base (no adaptation)", base)]
    runs_dir = work / f"lr{args.adapt_lr:g}-epochs{args.adapt_epochs}"
    runs.append(("fine-tuning (--init-from)", runs_dir / "finetune"))
    seconds = train(dirs["theo-adapt"], dirs["theo-dev"], runs_dir / "finetune", args.adapt_epochs, *adapt,
                    "--init-from", base_pt)
    print(f"finetune: {seconds:.0f} s", file=sys.stderr)
    for rho in args.rhos:
        model_dir = runs_dir / f"adapt-rho{rho:g}"
        seconds = train(dirs["theo-adapt"], dirs["theo-dev"], model_dir, args.adapt_epochs, *adapt,
                        "--adapt-from", base_pt, "--set", f"training.adapt_rho={rho:g}")
        print(f"adapt rho {rho:g}: {seconds:.0f} s", file=sys.stderr)
        runs.append((f"--adapt-from, adapt_rho {rho:g}", model_dir))
    count = {name: sum(1 for _ in open(dirs[name] / "utt2spk")) for name in ("old-test", "theo-test")}
    print(f"| model | best epoch | old speakers UER ({count['old-test']} utts) | theo UER ({count['theo-test']} utts) |")
    print("|---|---:|---:|---:|")
    for label, model_dir in runs:
        best = load_model_file(model_dir / "model.pt").extra["best_epoch"]
        print(f"| {label} | {best} | {error(model_dir, dirs['old-test']):.1%} | {error(model_dir, dirs['theo-test']):.1%} |")


if __name__ == "__main__":
    main()
