"""Which search strategy finds the best model for a fixed budget of training compute?

Strategies (each run with the project's own CLI: ``optim init/run/best``,
``plan run``, ``train``, ``evaluate``), every one for ``--seeds`` seeds:

* ``default``: the shipped default config trained to the end, no search (reference);
* ``random``: random search over the full default space;
* ``tpe``: flat TPE over the full space;
* ``tpe-hyperband``: flat TPE with the Hyperband pruner;
* ``staged``: a plan: random ``sm`` over the full space (half the budget) -> the
  ``sm`` study's ``top_k`` most important parameters -> a TPE ``lg`` stage started
  from ``sm``'s best config (the rest of the budget);
* ``staged-narrow``: the same with the plan options ``narrow`` (ranges narrowed to
  the bounding box of ``sm``'s best quarter) and ``enqueue_best`` (``sm``'s best
  trials re-run first in ``lg``);
* ``tpe-base`` and ``staged-base``: ``tpe`` and ``staged-narrow`` with the default
  config queued as the first trial (``optim init --enqueue-base``; in a plan,
  ``enqueue_base = true`` in ``sm``, a plan stage's own default): whether the
  default as a starting point helps a flat search as much as a staged one;
* ``tpe-local`` and ``staged-local``: ``tpe-base`` and ``staged-base`` searching
  near the default: every numeric range cut to a window of a quarter of its width
  (of its logarithm, for log ranges) around the default's value (``optim init
  --around-base 0.25``; in ``sm``, ``around_base = 0.25``; ``lg`` keeps the
  window and narrows within it): a local search from a config known to work.

"The full space" is every tunable parameter but ``training.num_epochs`` (fixed to
the scale's trial length) and ``training.early_stopping_*`` (a drawn patience
would end a trial early and measure the stopping rule) and ``training.adapt_rho``
(only for ``train --adapt-from``: a drawn value makes the best config untrainable
without a base model); the smoke and small
scales also fix the model's widths (see ``SCALES``).  No search strategy gets the
default config as a free first trial (``optim init`` without ``--enqueue-base``,
``enqueue_base = false`` in ``sm``) but the ``-base`` and ``-local`` ones; ``lg`` starts from ``sm``'s best (its plan
default).  Every study ranks trials by ``--metric error+loss``; curves and
tables show the dev token error rate (TER) of the trial's best epoch.

**Compute.**  The worker stores no CPU or GPU seconds per trial, so a trial's
compute is its wall time in the study (``datetime_start`` to
``datetime_complete``: sampling, the memory check, the time check and training)
with one torch thread per worker (``--threads 1``; on a GPU, one GPU per worker),
i.e. CPU (GPU) seconds up to the machine's own contention.  Trial-epochs (the
``epoch`` user attribute: epochs trained; 0 for a trial pruned before training or
reusing a twin's result) are a second view.  The compute of a run is the sum
over its finished trials; the curve point of a trial is (compute summed over the
trials finished by then, best dev TER so far).

**Equal budget.**  A run is grown in chunks and its compute read from its
SQLite study after each chunk; it stops once the compute reaches ``--budget``
(compute seconds).  Flat studies: ``optim init --num-trials`` large, then
``optim run --workers W --n-trials C`` per chunk.  Plans: the plan file is
rewritten with a larger ``trials`` for the stage being grown (``sm`` until it has
half the budget, then ``lg``) and ``plan run --force`` continues it (a larger
budget keeps the trials valid).  Each chunk gets its own sampler seed (a seeded
sampler restarted with the same seed repeats its draws).  Measuring instead of
sizing trial budgets from a mean trial cost keeps the budget equal whatever the
strategies' trial costs are (pruning makes TPE+Hyperband trials cheaper, the
narrowed stage's trials may be larger).  A run overshoots by at most the trials
running when the budget is reached (``W x C``); the curves and "final best" are
cut at the budget, but ``optim best`` (the config trained to the end) may come
from an overshooting trial (the CLI has no "best among trials finished before
T").  The staged runs' ``lg`` stage is never empty: when ``sm`` alone used the
budget, ``lg`` still runs one chunk (reported compute says so).

**Final step.**  Each run's best config (``optim best``; staged: the ``lg``
study's, which starts from ``sm``'s best) is trained for the scale's final
epochs with ``stagetune train`` and evaluated on ``--test`` with ``stagetune
evaluate --json``.

**Output** under ``--out``: one dir per strategy and seed (``STRATEGY/seed-N``:
``optim.db``, checkpoints, ``final/``, ``done.json`` once finished; a rerun skips
finished runs and continues unfinished ones from their studies), ``curves.png``
(best dev TER so far against compute and against trial-epochs: interquartile mean
over seeds with a 95% seeded bootstrap band), ``results.json`` and the markdown
table (printed): final best dev TER and test TER (median and min-max over seeds)
and the compute each strategy needs to reach flat TPE's final IQM dev TER.

Scales: ``smoke`` (a 24/12/12-utterance subset, 1-epoch trials, a tiny fixed-width
model, a 20-second budget: a check that the script works, seconds per strategy),
``small`` (2 CPU cores, 2 workers; about 50 min per seed for the first six strategies
(measured), so 4-5 hours for 5 seeds, resumable: 200/60 train/dev
utterances and the full test set, 5-epoch trials, 10 final epochs, widths fixed
at 64 recurrent units and 8 conv channels; budget 600 s per run), ``full`` (the
whole corpus and space, 5-epoch trials, the default 40 final epochs, on a GPU).

    python bench/search_quality.py --scale small
    python bench/search_quality.py --scale smoke --seeds 1 --out exp/sq-smoke
    python bench/search_quality.py --scale full --device cuda --workers 1 --gpus 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

STAGETUNE = [sys.executable, "-c", "import sys; from stagetune.cli import main; sys.exit(main())"]
STUDY = "sq"
METRIC = "error+loss"
FULL_SPACE_BLACKLIST = [r"training\.num_epochs", r"training\.early_stopping_.*", r"training\.adapt_rho"]
#: ``optim init --around-base`` of the local strategies: each numeric range cut to a quarter around the default
AROUND = 0.25
#: flat strategies: (sampler, pruner, the default config queued first, --around-base)
FLAT = {"random": ("random", "none", False, None), "tpe": ("tpe", "none", False, None),
        "tpe-hyperband": ("tpe", "hyperband", False, None), "tpe-base": ("tpe", "none", True, None),
        "tpe-local": ("tpe", "none", True, AROUND)}
_NARROW = {"narrow": "0.25", "enqueue_best": "2"}
#: staged strategies: the sm and lg stages' plan options beyond the common ones
STAGED = {"staged": ({}, {}), "staged-narrow": ({}, _NARROW), "staged-base": ({"enqueue_base": "true"}, _NARROW),
          "staged-local": ({"enqueue_base": "true", "around_base": str(AROUND)}, _NARROW)}
STRATEGIES = ["default", *FLAT, *STAGED]
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class Scale:
    """A preset: the data cut, the trial and final lengths, the fixed model widths, the budget."""

    subset: tuple[int, int, int] | None  # train, dev, test utterances (None: all)
    trial_epochs: int
    final_epochs: int
    budget: float  # compute seconds per run
    chunk: int  # trials per worker per chunk
    top_k: int
    mem_limit_bytes: int
    sets: tuple[str, ...] = ()  # base config edits
    fixed: tuple[str, ...] = ()  # regexes of parameters the edits fix (not tuned)
    notes: str = ""
    extra: dict = field(default_factory=dict)


_WIDTHS = (r"model\.convolutional_initial_channels", r"model\.recurrent_size")
SCALES = {
    "smoke": Scale(
        subset=(24, 12, 12), trial_epochs=1, final_epochs=2, budget=20.0, chunk=1, top_k=2,
        mem_limit_bytes=100_000_000,
        sets=("model.convolutional_initial_channels=4", "model.recurrent_size=16", "model.convolutional_layers=1",
              "model.recurrent_layers=1", "data.min_batches_per_epoch=4"),
        fixed=(*_WIDTHS, r"model\.convolutional_layers", r"model\.recurrent_layers"),
        notes="24/12/12 utterances, 1-epoch trials, 2 final epochs, a 1-conv 1-GRU-layer model of fixed widths",
    ),
    "small": Scale(
        # 5-epoch trials: with the default 64 updates per epoch the default config
        # leaves the all-blank plateau at epoch 4-5 on this cut (3-epoch trials, or
        # 16 updates per epoch, left every trial at 100% dev TER: measured 2026-11-28)
        subset=(200, 60, None), trial_epochs=5, final_epochs=10, budget=600.0, chunk=1, top_k=4,
        mem_limit_bytes=300_000_000,
        sets=("model.convolutional_initial_channels=8", "model.recurrent_size=64"),
        fixed=_WIDTHS,
        notes="200 train / 60 dev utterances (the full test set), 5-epoch trials, 10 final epochs, "
              "widths fixed (8 conv channels, 64 recurrent units)",
    ),
    "full": Scale(
        subset=None, trial_epochs=5, final_epochs=40, budget=4 * 3600.0, chunk=2, top_k=5,
        mem_limit_bytes=6_000_000_000, notes="the whole corpus and default space",
    ),
}


def say(line: str) -> None:
    print(line, flush=True)


def stagetune(args: list[str], log: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI, its output appended to ``log``; exit with the log's tail if it fails."""
    with log.open("a") as handle:
        handle.write("+ stagetune " + " ".join(args) + "\n")
        handle.flush()
        proc = subprocess.run(STAGETUNE + args, stdout=subprocess.PIPE, stderr=handle, text=True)
        handle.write(proc.stdout)
    if check and proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        sys.exit(f"search_quality: stagetune {' '.join(args[:6])} ... failed (exit {proc.returncode}); "
                 f"end of {log}:\n{tail}")
    return proc


# ---------------------------------------------------------------- data


def _pick(ids: list[str], n: int) -> set[str]:
    """``n`` ids chosen by a hash of the id (the same ones every run)."""
    return set(sorted(ids, key=lambda u: hashlib.sha256(u.encode()).hexdigest())[:n])


def subset_dir(src: Path, dst: Path, n: int | None) -> Path:
    """A Kaldi data dir holding ``n`` utterances of ``src`` (``src`` itself when None)."""
    if n is None:
        return src
    if (dst / "feats.scp").exists():
        return dst
    ids = [line.split(maxsplit=1)[0] for line in (src / "feats.scp").read_text().splitlines() if line.strip()]
    keep = _pick(ids, n)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    per_utt = ("text", "utt2spk", "utt2label", "utt2class", "utt2value", "utt2num_frames", "utt2dur")
    for name in ("feats.scp", "cmvn.scp", "targets.scp"):
        if (src / name).exists():
            lines = []
            for line in (src / name).read_text().splitlines():
                key, path = line.split(maxsplit=1)
                if name != "cmvn.scp" and key not in keep:
                    continue
                ark = path.rsplit(":", 1)[0] if ":" in path else path
                if not os.path.isabs(ark):
                    path = str((src / ark).resolve()) + path[len(ark):]
                lines.append(f"{key} {path}")
            (tmp / name).write_text("\n".join(lines) + "\n")
    for name in per_utt:
        if (src / name).exists():
            lines = [ln for ln in (src / name).read_text().splitlines() if ln.split(maxsplit=1)[0] in keep]
            (tmp / name).write_text("\n".join(lines) + "\n")
    if (src / "tokens.txt").exists():
        (tmp / "tokens.txt").write_text((src / "tokens.txt").read_text())
    if (tmp / "utt2spk").exists():
        spk: dict[str, list[str]] = {}
        for line in (tmp / "utt2spk").read_text().splitlines():
            utt, who = line.split()
            spk.setdefault(who, []).append(utt)
        (tmp / "spk2utt").write_text("".join(f"{s} {' '.join(u)}\n" for s, u in sorted(spk.items())))
    tmp.rename(dst)
    return dst


# ---------------------------------------------------------------- reading a run's studies


@dataclass
class TrialRow:
    study: str
    state: str
    seconds: float
    epochs: int
    dev_error: float | None
    completed: datetime


def trials(db: Path) -> list[TrialRow]:
    """Finished trials of every study in ``db``, in order of completion."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT t.trial_id, s.study_name, t.state, t.datetime_start, t.datetime_complete "
            "FROM trials t JOIN studies s ON s.study_id = t.study_id"
        ).fetchall()
        attrs: dict[int, dict[str, object]] = {}
        for trial_id, key, value in conn.execute(
            "SELECT trial_id, key, value_json FROM trial_user_attributes WHERE key IN ('epoch', 'dev_error')"
        ):
            attrs.setdefault(trial_id, {})[key] = json.loads(value)
    out = []
    for trial_id, study, state, start, end in rows:
        if state not in FINISHED or start is None or end is None:
            continue
        start, end = datetime.fromisoformat(str(start)), datetime.fromisoformat(str(end))
        a = attrs.get(trial_id, {})
        error = a.get("dev_error") if state == "COMPLETE" else None
        out.append(TrialRow(study, state, (end - start).total_seconds(), int(a.get("epoch", 0) or 0),
                            None if error is None else float(error), end))
    return sorted(out, key=lambda r: r.completed)


def curve(rows: list[TrialRow]) -> dict[str, list[float]]:
    """Cumulative compute and trial-epochs, and the best dev TER so far, after each finished trial."""
    seconds, epochs, best = np.cumsum([r.seconds for r in rows]), np.cumsum([r.epochs for r in rows]), []
    current = np.nan
    for r in rows:
        if r.dev_error is not None and not (current <= r.dev_error):
            current = r.dev_error
        best.append(current)
    return {"seconds": seconds.tolist(), "epochs": [int(e) for e in epochs], "best": best}


def spent(db: Path, study: str | None = None) -> float:
    return sum(r.seconds for r in trials(db) if study is None or r.study == study)


# ---------------------------------------------------------------- runs


class Run:
    """One strategy x seed in its own dir, its own SQLite database."""

    def __init__(self, args: argparse.Namespace, scale: Scale, data: dict[str, Path], strategy: str, seed: int):
        self.args, self.scale, self.data, self.strategy, self.seed = args, scale, data, strategy, seed
        self.dir = Path(args.out) / strategy / f"seed-{seed}"
        self.db = self.dir / "optim.db"
        self.url = f"sqlite:///{self.db}"
        self.log = self.dir / "log.txt"
        self.state_path = self.dir / "state.json"

    # state.json: chunks run so far (each gets its own sampler seed), the stage being grown
    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {"chunks": 0}

    def save(self, state: dict) -> None:
        self.state_path.write_text(json.dumps(state, indent=1))

    def sets(self) -> list[str]:
        return [*self.scale.sets, f"training.seed={self.seed}", *self.args.sets]

    def device(self) -> list[str]:
        return ["--device", self.args.device] if self.args.device else []

    def chunk_seed(self, chunk: int) -> int:
        return self.seed * 100_003 + chunk * max(self.args.workers, 1)

    def pool(self) -> list[str]:
        return ["--workers", str(self.args.workers), "--threads", "1"] + (["--gpus", self.args.gpus] if self.args.gpus else [])

    def go(self) -> dict:
        done = self.dir / "done.json"
        if done.exists():
            return json.loads(done.read_text())
        self.dir.mkdir(parents=True, exist_ok=True)
        say(f"== {self.strategy} seed {self.seed} ({self.dir})")
        if self.strategy == "default":
            best_ini = None
        elif self.strategy in FLAT:
            best_ini = self.flat()
        else:
            best_ini = self.staged()
        result = self.final(best_ini)
        rows = trials(self.db)
        result.update(strategy=self.strategy, seed=self.seed, curve=curve(rows), trials=len(rows),
                      compute_s=sum(r.seconds for r in rows), trial_epochs=sum(r.epochs for r in rows))
        done.write_text(json.dumps(result, indent=1))
        say(f"   {self.strategy} seed {self.seed}: {len(rows)} trials, {result['compute_s']:.0f} s, "
            f"dev TER {result['dev_error']:.2%}, test TER {result['test_error']:.2%}")
        return result

    def flat(self) -> Path:
        sampler, pruner, base, around = FLAT[self.strategy]
        blacklist = FULL_SPACE_BLACKLIST + list(self.scale.fixed)
        stagetune(
            [x for s in self.sets() for x in ("--set", s)]
            + ["--set", f"training.num_epochs={self.scale.trial_epochs}", *self.device(),
               "optim", "--study-name", STUDY, self.url, "init", str(self.data["train"]),
               "--dev-dir", str(self.data["dev"]), "--blacklist", *blacklist, "--num-trials", "100000",
               "--pruner", pruner, "--sampler", sampler, "--metric", METRIC,
               "--mem-limit-bytes", str(self.scale.mem_limit_bytes), *(["--enqueue-base"] if base else []),
               *(["--around-base", str(around)] if around else [])],
            self.log,
        )
        state = self.state()
        while spent(self.db) < self.budget:
            stagetune(["optim", "--study-name", STUDY, self.url, "run", *self.pool(), *self.device(),
                       "--n-trials", str(self.scale.chunk), "--seed", str(self.chunk_seed(state["chunks"])),
                       "--ckpt-dir", str(self.dir / "ckpt"), "--quiet"], self.log)
            state["chunks"] += 1
            self.save(state)
            say(f"   chunk {state['chunks']}: {spent(self.db):.0f}/{self.budget:.0f} s")
        return self.best(STUDY)

    @property
    def budget(self) -> float:
        return self.args.budget if self.args.budget is not None else self.scale.budget

    def plan_text(self, sm_trials: int, lg_trials: int | None, seed: int) -> str:
        blacklist = " ".join(FULL_SPACE_BLACKLIST + list(self.scale.fixed))
        sm_options, lg_options = STAGED[self.strategy]
        text = (
            f"[plan]\nname = {STUDY}\ntrain = {self.data['train']}\ndev = {self.data['dev']}\n"
            f"url = {self.url}\nout_dir = {self.dir}\nworkers = {self.args.workers}\n\n"
            f"[sm]\nset = {' '.join(self.sets())}\nblacklist = {blacklist}\nepochs = {self.scale.trial_epochs}\n"
            f"trials = {sm_trials}\nsampler = random\npruner = none\nmetric = {METRIC}\n"
            f"mem_limit_bytes = {self.scale.mem_limit_bytes}\nenqueue_base = {sm_options.get('enqueue_base', 'false')}\n"
            f"seed = {seed}\n"
        )
        text += "".join(f"{k} = {v}\n" for k, v in sm_options.items() if k != "enqueue_base")
        if lg_trials is not None:
            text += f"\n[lg]\nfrom = sm\ntop_k = {self.scale.top_k}\ntrials = {lg_trials}\nsampler = tpe\nseed = {seed}\n"
            text += "".join(f"{k} = {v}\n" for k, v in lg_options.items())
        return text

    def staged(self) -> Path:
        state = self.state()
        state.setdefault("sm", 0)
        state.setdefault("lg", None)
        plan = self.dir / "plan.ini"
        step = self.args.workers * self.scale.chunk
        while True:
            sm_done = state["lg"] is not None
            if sm_done and spent(self.db) >= self.budget and state.get("lg_ran"):
                break
            if not sm_done and state["sm"] and spent(self.db) >= self.budget / 2 and state.get("sm_ran"):
                # sm has its half; importance needs a few completed trials
                state["lg"] = 0
                sm_done = True
            if sm_done:
                state["lg"] += step
            else:
                state["sm"] = max(state["sm"] + step, self.scale.top_k + 1 if not state["sm"] else 0)
            plan.write_text(self.plan_text(state["sm"], state["lg"], self.chunk_seed(state["chunks"])))
            state["chunks"] += 1
            self.save(state)
            cmd = ["plan", str(plan), "run", "--workers", str(self.args.workers), "--force"]
            stagetune(cmd + (["--gpus", self.args.gpus] if self.args.gpus else []), self.log)
            state["lg_ran" if sm_done else "sm_ran"] = True
            self.save(state)
            say(f"   chunk {state['chunks']} (sm {state['sm']}, lg {state['lg']} trials): "
                f"{spent(self.db):.0f}/{self.budget:.0f} s")
        return self.best(f"{STUDY}-lg")

    def best(self, study: str) -> Path:
        out = self.dir / "best.ini"
        stagetune(["optim", "--study-name", study, self.url, "best", str(out)], self.log)
        return out

    def final(self, best_ini: Path | None) -> dict:
        """Train the best (or default) config to the end, then evaluate on test."""
        model_dir = self.dir / "final"
        config = ["--read-ini", str(best_ini)] if best_ini else [x for s in self.sets() for x in ("--set", s)]
        started = datetime.now()
        stagetune(config + ["--set", f"training.num_epochs={self.scale.final_epochs}", *self.device(),
                            "train", str(self.data["train"]), str(self.data["dev"]), str(model_dir),
                            "--quiet", "--threads", "1"], self.log)
        train_s = (datetime.now() - started).total_seconds()
        dev = _dev_history(model_dir)
        proc = stagetune(["evaluate", str(model_dir / "model.pt"), str(self.data["test"]), "--json",
                          "--threads", "1", *self.device()], self.log)
        result = json.loads(proc.stdout)
        test = _error_of(result)
        return {"dev_error": min(dev), "test_error": test, "final_train_s": train_s}


def _dev_history(model_dir: Path) -> list[float]:
    """Dev TER after each epoch of a ``train`` run."""
    import csv

    with (model_dir / "history.csv").open() as handle:
        return [float(r["dev_error"]) for r in csv.DictReader(handle)]


def _error_of(result: dict) -> float:
    for key in ("rate",):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    raise SystemExit(f"search_quality: no error rate in evaluate --json output: {sorted(result)}")


# ---------------------------------------------------------------- aggregation


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle half (floor(n/4) cut from each end)."""
    values = np.sort(values, axis=axis)
    n = values.shape[axis]
    cut = n // 4
    return np.take(values, range(cut, n - cut), axis=axis).mean(axis=axis)


def bootstrap(values: np.ndarray, rng: np.random.Generator, reps: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap band of the IQM over seeds (rows) at every grid point (columns)."""
    n = values.shape[0]
    stats = np.stack([iqm(values[rng.integers(0, n, n)]) for _ in range(reps)])
    return np.percentile(stats, 2.5, axis=0), np.percentile(stats, 97.5, axis=0)


def on_grid(curves: list[dict], key: str, grid: np.ndarray) -> np.ndarray:
    """Best-so-far of each seed at each grid point (NaN before its first completed trial)."""
    out = np.full((len(curves), len(grid)), np.nan)
    for i, c in enumerate(curves):
        x, y = np.asarray(c[key], dtype=float), np.asarray(c["best"], dtype=float)
        idx = np.searchsorted(x, grid, side="right") - 1
        ok = idx >= 0
        out[i, ok] = y[idx[ok]]
    return out


def aggregate(results: dict[str, list[dict]], budget: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, budget, 200)[1:]
    agg: dict[str, dict] = {}
    for strategy, runs in results.items():
        # the default config's "search" is one trial of the trial length: its final training's dev
        # TER within that many epochs (the schedule counts updates, so the first epochs are that trial)
        dev = np.array([r["trial_dev_error"] if strategy == "default" else _final_best(r, budget) for r in runs])
        test = np.array([r["test_error"] for r in runs])
        entry = {"seeds": len(runs), "dev_median": float(np.nanmedian(dev)), "dev_min": float(np.nanmin(dev)),
                 "dev_max": float(np.nanmax(dev)), "dev_iqm": float(iqm(dev)), "test_median": float(np.median(test)),
                 "test_min": float(test.min()), "test_max": float(test.max()),
                 "final_dev_median": float(np.median([r["dev_error"] for r in runs])),
                 # default: no search; its compute is the final training's
                 "compute_median": float(np.median([r["final_train_s" if strategy == "default" else "compute_s"]
                                                   for r in runs])),
                 "epochs_median": float(np.median([r["trial_epochs"] for r in runs]))}
        if strategy != "default":
            ys = on_grid([r["curve"] for r in runs], "seconds", grid)
            full = ~np.isnan(ys).any(axis=0)
            mid, (lo, hi) = np.full(len(grid), np.nan), (np.full(len(grid), np.nan), np.full(len(grid), np.nan))
            if full.any():
                mid[full] = iqm(ys[:, full])
                band = bootstrap(ys[:, full], rng)
                lo[full], hi[full] = band
            entry["grid"], entry["iqm"], entry["lo"], entry["hi"] = grid.tolist(), mid.tolist(), lo.tolist(), hi.tolist()
            egrid = np.linspace(0, max(max(r["curve"]["epochs"] or [0]) for r in runs) or 1, 200)[1:]
            ye = on_grid([r["curve"] for r in runs], "epochs", egrid)
            fe = ~np.isnan(ye).any(axis=0)
            me = np.full(len(egrid), np.nan)
            if fe.any():
                me[fe] = iqm(ye[:, fe])
            entry["egrid"], entry["eiqm"] = egrid.tolist(), me.tolist()
        agg[strategy] = entry
    target = agg.get("tpe", {}).get("dev_iqm")
    for strategy, entry in agg.items():
        entry["to_tpe_final_s"] = None
        if target is not None and "iqm" in entry:
            hit = [x for x, y in zip(entry["grid"], entry["iqm"]) if y == y and y <= target]
            entry["to_tpe_final_s"] = hit[0] if hit else None
    return agg


def _final_best(run: dict, budget: float) -> float:
    """Best dev TER among the trials finished within the budget."""
    c = run["curve"]
    within = [b for s, b in zip(c["seconds"], c["best"]) if s <= budget and b == b]
    return within[-1] if within else float("nan")


def table(agg: dict, budget: float) -> str:
    lines = ["| strategy | seeds | best dev TER at budget, median [min, max] | test TER of its best config trained "
             "to the end, median [min, max] | its dev TER (final training), median | compute spent, s (median) | "
             "trial-epochs (median) | compute to reach flat TPE's final dev TER (IQM) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for strategy, e in agg.items():
        reach = "-" if strategy == "default" else (
            f"{e['to_tpe_final_s']:.0f} s ({e['to_tpe_final_s'] / budget:.0%})" if e["to_tpe_final_s"] else "not reached")
        search = f"{e['dev_median']:.2%} [{e['dev_min']:.2%}, {e['dev_max']:.2%}]" + (
            " (one trial)" if strategy == "default" else "")
        lines.append(
            f"| {strategy} | {e['seeds']} | {search} | "
            f"{e['test_median']:.2%} [{e['test_min']:.2%}, {e['test_max']:.2%}] | {e['final_dev_median']:.2%} | "
            f"{e['compute_median']:.0f} | "
            f"{e['epochs_median']:.0f} | {reach} |")
    return "\n".join(lines)


def plot(agg: dict, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, e in agg.items():
        if strategy == "default":
            for a in (ax, bx):
                a.axhline(e["dev_iqm"], color="k", linestyle="--", linewidth=1,
                          label="default config, one trial (IQM)")
            continue
        line, = ax.plot(e["grid"], e["iqm"], label=strategy)
        ax.fill_between(e["grid"], e["lo"], e["hi"], color=line.get_color(), alpha=0.2)
        bx.plot(e["egrid"], e["eiqm"], label=strategy, color=line.get_color())
    ax.set_xlim(0, budget)
    ax.set_xlabel("training compute, s (summed trial seconds, 1 thread per worker)")
    bx.set_xlabel("trial-epochs")
    for a in (ax, bx):
        a.set_ylabel("best dev TER so far (IQM over seeds)")
        a.grid(alpha=0.3)
    ax.set_title("anytime curves, 95% bootstrap band")
    bx.set_title("against trial-epochs (IQM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="data/fsdd-connected/train")
    p.add_argument("--dev", default="data/fsdd-connected/dev")
    p.add_argument("--test", default="data/fsdd-connected/test")
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=STRATEGIES)
    p.add_argument("--budget", type=float, default=None, help="compute seconds per run (default: the scale's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus", default=None, help="GPU ids for the workers (optim run --gpus)")
    p.add_argument("--device", default=None, help="torch device (default: the CLI's, cuda if available)")
    p.add_argument("--out", default="exp/search_quality")
    p.add_argument("--report", action="store_true",
                   help="run nothing: the table and curves of the runs finished so far (a bench in progress)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="edit every run's base config (a rerun must repeat them)")
    args = p.parse_args()
    if args.seeds < 1 or args.workers < 1:
        p.error("--seeds and --workers must be >= 1")
    scale = SCALES[args.scale]
    for name in ("train", "dev", "test"):
        if not (Path(getattr(args, name)) / "feats.scp").exists():
            p.error(f"--{name} {getattr(args, name)}: not a Kaldi data dir (no feats.scp)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the preset's own fields too: a preset edited since a run started is another bench
    settings = {"scale": args.scale, "preset": json.loads(json.dumps(asdict(scale))), "budget": args.budget,
                "workers": args.workers, "sets": args.sets, "train": args.train, "dev": args.dev, "test": args.test}
    recorded = out / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        p.error(f"{out} holds a bench with other settings ({recorded}); use another --out")
    recorded.write_text(json.dumps(settings, indent=1))
    cut = scale.subset or (None, None, None)
    data = {name: subset_dir(Path(getattr(args, name)).resolve(), (out / "data" / name).resolve(), n)
            for name, n in zip(("train", "dev", "test"), cut)}
    budget = args.budget if args.budget is not None else scale.budget
    results: dict[str, list[dict]] = {s: [] for s in args.strategies}
    for seed in range(args.seeds):
        for strategy in args.strategies:
            run = Run(args, scale, data, strategy, seed)
            if not args.report:
                results[strategy].append(run.go())
            elif (run.dir / "done.json").exists():
                results[strategy].append(json.loads((run.dir / "done.json").read_text()))
    for r in results.get("default", []):  # the default's one trial: its final training's first epochs
        r["trial_dev_error"] = min(_dev_history(out / "default" / f"seed-{r['seed']}" / "final")[: scale.trial_epochs])
    results = {s: runs for s, runs in results.items() if runs}
    if not results:
        sys.exit(f"search_quality: no finished run under {out} to report")
    agg = aggregate(results, budget, seed=0)
    plot(agg, budget, out / "curves.png")
    text = table(agg, budget)
    (out / "results.json").write_text(json.dumps({"settings": settings, "scale_notes": scale.notes,
                                                   "aggregate": agg, "runs": results}, indent=1))
    (out / "table.md").write_text(text + "\n")
    print(f"\nscale {args.scale} ({scale.notes}); budget {budget:.0f} compute-s per run; "
          f"{args.seeds} seed(s); {args.workers} worker(s)\n")
    print(text)
    print(f"\ncurves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
