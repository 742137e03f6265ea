"""Frame regression on FSDD, held-out speakers: a target that needs context (issue 12).

The target of frame t is the frame log-energy averaged over frames t-5 .. t+5
(an 11-frame window, about 110 ms): the log of the summed mel energies of each
frame (``logsumexp`` over the log-mel bins), then a moving average clipped at the
utterance's ends.  It is not a function of frame t alone, so a model has to read
its neighbours.  Features are normalised with global statistics (``data.normalization
= global``): per-speaker normalisation would remove the level the target measures.

Data: the isolated-digit layout (``stagetune prep-fsdd --isolated digits``: four
training speakers, theo for dev, lucas for test); this script writes each split's
``targets.scp`` into a copy of the split (features shared by absolute path) under
``--out``, trains ``model.task = regress`` with the shipped defaults otherwise, and
prints ``stagetune evaluate``'s MSE and CCC on the test speaker.

Run: ``.venv/bin/python bench/fsdd_regression.py --data data/fsdd-digits --out exp/regress
[--epochs 6]``; results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np

WINDOW = 5  # frames either side


def smoothed_log_energy(feats: np.ndarray) -> np.ndarray:
    """``(T, 1)``: each frame's log energy (logsumexp of its log-mel bins), averaged over +-WINDOW frames."""
    peak = feats.max(axis=1, keepdims=True)
    energy = (peak + np.log(np.exp(feats - peak).sum(axis=1, keepdims=True)))[:, 0]
    padded = np.concatenate([[0.0], np.cumsum(energy)])
    t = np.arange(len(energy))
    lo, hi = np.maximum(t - WINDOW, 0), np.minimum(t + WINDOW + 1, len(energy))
    return ((padded[hi] - padded[lo]) / (hi - lo)).astype(np.float32)[:, None]


def with_targets(split: Path, out: Path) -> Path:
    """A copy of ``split``'s lists with ``targets.scp`` beside them (features by absolute path)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("utt2spk", "spk2utt", "text", "utt2num_frames"):
        if (split / name).is_file():
            shutil.copy(split / name, out / name)
    feats = dict(kaldiio.load_scp(str(split / "feats.scp")))
    with open(out / "feats.scp", "w") as scp:
        for line in (split / "feats.scp").read_text().splitlines():
            utt, spec = line.split(maxsplit=1)
            spec_path = Path(spec.rsplit(":", 1)[0])
            absolute = spec_path if spec_path.is_absolute() else (split / spec_path).resolve()
            scp.write(f"{utt} {absolute}:{spec.rsplit(':', 1)[1]}\n")
    with kaldiio.WriteHelper(f"ark,scp:{out / 'targets.ark'},{out / 'targets.scp'}") as writer:
        for utt in sorted(feats):
            writer(utt, smoothed_log_energy(np.asarray(feats[utt], dtype=np.float64)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/fsdd-digits"))
    parser.add_argument("--out", type=Path, default=Path("exp/regress"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="more config settings for the training")
    args = parser.parse_args()
    stagetune = [sys.executable, "-m", "stagetune"]
    data = args.out / "data"
    splits = {s: data / s if (data / s / "targets.scp").is_file() else with_targets(args.data / s, data / s)
              for s in ("train", "dev", "test")}
    model = args.out / "model"
    if model.exists():
        shutil.rmtree(model)
    settings = ["--set", "model.task=regress", "--set", "data.normalization=global",
                "--set", f"training.num_epochs={args.epochs}"]
    settings += [arg for override in args.overrides for arg in ("--set", override)]
    started = time.time()
    subprocess.run([*stagetune, *settings, "train", splits["train"], splits["dev"], model, "--threads", "1",
                    "--quiet"], check=True)
    trained = time.time() - started
    done = subprocess.run([*stagetune, "evaluate", model / "model.pt", splits["test"], "--json"], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout)
    print(f"trained {args.epochs} epochs in {trained:.0f} s; test (lucas): {json.dumps(result)}")
    print((model / "history.csv").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
