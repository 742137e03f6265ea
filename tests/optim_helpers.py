"""Shared helpers of the ``optim`` tests: the real CLI in a subprocess, spec'd studies.

User-facing behaviour is checked through ``python -m stagetune`` in a subprocess
(:func:`cli`, :func:`cli_many`, :func:`start_cli`); studies that a test only needs
as a starting point are created in-process with the same library calls
``optim init`` makes (:func:`create_study`), which saves a torch import per test.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir

from stagetune.config import load_config
from stagetune.optim.sampling import sample_values
from stagetune.optim.spec import StudySpec
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study

__all__ = [
    "STAGETUNE",
    "cli",
    "cli_many",
    "start_cli",
    "stop_group",
    "assert_one_line_error",
    "write_speech_data",
    "create_study",
    "opened_study",
    "trial_states",
    "read_spec",
    "study_names",
    "wait_for",
    "LR_DOMINATED",
    "lr_dominated",
    "fill_study",
]

STAGETUNE = (sys.executable, "-m", "stagetune")
_TIMEOUT_S = 300


def _command(args: Sequence[Any]) -> list[str]:
    return [*STAGETUNE, *(str(a) for a in args)]


def cli(args: Sequence[Any], cwd: Path, *, timeout: float = _TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``stagetune ARGS`` in ``cwd`` and capture its output."""
    return subprocess.run(
        _command(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def cli_many(
    commands: Sequence[Sequence[Any]], cwd: Path, *, timeout: float = _TIMEOUT_S
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent ``stagetune`` commands at the same time (each pays the imports)."""
    procs = [
        subprocess.Popen(_command(c), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    done = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(_command(command), proc.returncode, out, err))
    return done


def start_cli(args: Sequence[Any], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``stagetune ARGS`` in the background in its own process group.

    stdout and stderr go to ``log`` (a pipe nobody reads could fill and block it).
    """
    with log.open("wb") as handle:
        return subprocess.Popen(
            _command(args), cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a :func:`start_cli` process and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with one ``stagetune: error:`` line holding every needle."""
    assert done.returncode != 0, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stagetune: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_speech_data(
    path: Path, num_utts: int = 12, *, min_frames: int = 5, max_frames: int = 30
) -> Path:
    """A real Kaldi CTC data dir (feats.scp/ark, text, tokens.txt, utt2spk, cmvn.scp)."""
    feats, utt2spk = random_feats(num_utts, min_frames=min_frames, max_frames=max_frames)
    rng = np.random.default_rng(1)
    text = {
        utt: [TINY_TOKENS[j] for j in rng.integers(0, len(TINY_TOKENS), size=rng.integers(1, 5))]
        for utt in feats
    }
    return write_data_dir(path, feats, text, tokens=TINY_TOKENS, utt2spk=utt2spk, cmvn=True)


def create_study(
    url: str,
    study_name: str,
    data_dir: Path,
    *,
    overrides: Sequence[str] = (),
    whitelist: Sequence[str] = (),
    blacklist: Sequence[str] = (),
    num_trials: int | None = None,
    pruner: str = "hyperband",
    mem_limit_bytes: int | None = None,
) -> StudySpec:
    """What ``stagetune --set ... optim URL --study-name NAME init DATA ...`` creates."""
    spec = build_spec(
        load_config((), overrides),
        data_dir,
        whitelist=whitelist,
        blacklist=blacklist,
        num_trials=num_trials,
        pruner=pruner,
        mem_limit_bytes=mem_limit_bytes,
    )
    with storage_session(url) as storage:
        result = init_study(storage, study_name, url, spec, log=lambda _message: None)
    assert result.action == "created"
    return spec


@contextmanager
def opened_study(url: str, study_name: str) -> Iterator[optuna.Study]:
    """The study as plain optuna sees it; the connections close on exit."""
    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        yield optuna.load_study(study_name=study_name, storage=storage)


def trial_states(url: str, study_name: str) -> Counter[str]:
    """How many trials of the study are in each state."""
    with opened_study(url, study_name) as study:
        return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def read_spec(url: str, study_name: str) -> dict[str, Any]:
    """The stored spec, as JSON data."""
    with opened_study(url, study_name) as study:
        return dict(study.user_attrs["stagetune_spec"])


def study_names(url: str) -> list[str]:
    """The studies in the database (none when the SQLite file does not exist)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return []
    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        return [s.study_name for s in storage.get_all_studies()]


def wait_for(what: str, predicate: Any, *, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


#: Tuned names of :func:`lr_dominated` studies.
LR_DOMINATED = ("training.learning_rate", "training.dropout_prob", "model.recurrent_type")


def lr_dominated(values: dict[str, Any]) -> float:
    """An error dominated by the learning rate; the other two parameters barely matter."""
    rate = math.log10(float(values["training.learning_rate"]))
    kind = {"lstm": 0.0, "gru": 0.01, "rnn": 0.02}[str(values["model.recurrent_type"])]
    return (rate + 2.5) ** 2 + 0.05 * float(values["training.dropout_prob"]) + kind


def fill_study(
    url: str,
    study_name: str,
    spec: StudySpec,
    num_trials: int,
    objective: Callable[[dict[str, Any]], float] = lr_dominated,
    *,
    seed: int = 3,
) -> optuna.trial.FrozenTrial:
    """Ask/tell ``num_trials`` trials sampled as workers sample them; the best trial."""
    with opened_study(url, study_name) as study:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
        for _ in range(num_trials):
            trial = study.ask()
            study.tell(trial, objective(sample_values(trial, spec.config(), spec.tuned)))
        return study.best_trial
