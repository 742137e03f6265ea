"""Faults on live PostgreSQL and MariaDB that a worker must survive without losing a trial.

* an outage longer than the retry window, then a hung server (SIGSTOP, kept until a
  worker's call has timed out on it): every trial in flight is reported once the
  server is back, and the budget is met exactly;
* two workers given different heartbeat options: one rule per study, so neither
  takes the other's live trial, and only one writes its checkpoint dir;
* a trial taken over by another worker: its first worker stops it in one line,
  writes nothing more to its checkpoint dir, and goes on;
* a trial that fails for an infrastructure reason (its checkpoint dir cannot be
  written) is re-queued and finished by another worker; a model's error is not.

Windows and timeouts are scaled down through STAGETUNE_DB_RETRY_S and STAGETUNE_DB_TIMEOUT_S.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from fixtures_db import TEST_DB_PASSWORD, ServerDatabase
from optim_helpers import STAGETUNE, create_study, opened_study, trial_states, wait_for, write_speech_data
from optuna.trial import TrialState

from stagetune.errors import StagetuneError
from stagetune.optim.claim import HEARTBEAT_ATTR, Claims
from stagetune.optim.storage import READ_TIMEOUT_ENV, RETRY_WINDOW_ENV, storage_session
from stagetune.optim.study import load_study
from stagetune.optim.worker import WorkerOptions, infrastructure_failure, run_worker

pytestmark = [pytest.mark.slow]

RETRY_WINDOW_S = 2
READ_TIMEOUT_S = 3
#: How long a hung server is kept stopped, at most, waiting for a worker's call to time out on it.
HANG_LIMIT_S = 40
#: A worker's line for a call that timed out on a hung server (see storage.retry_transient).
HANG_NOTICED = re.compile(r"unreachable \((connection timed out|lost connection to the server)\)")
#: Small model, batches of 2 utterances: epochs of about a second.
TINY_MODEL = [
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=8",
    "data.batch_size=2",
]


def _env() -> dict[str, str]:
    return {**os.environ, RETRY_WINDOW_ENV: str(RETRY_WINDOW_S), READ_TIMEOUT_ENV: str(READ_TIMEOUT_S)}


def _start(url: str, name: str, cwd: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [*STAGETUNE, "optim", "--study-name", name, url, "run", *args],
            cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=_env(),
        )


def _family(pid: int) -> list[int]:
    """``pid`` and all its descendants (a PostgreSQL server's backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # a backend that ended meanwhile
            pass


def _freeze(server: Any) -> list[int]:
    """Stop the server's process family (SIGSTOP: it neither answers nor refuses); its pids.

    The server process first (it forks no backend then), then the family until no new one shows.
    """
    pids = [server.pid()]
    _signal_all(pids, signal.SIGSTOP)
    while True:
        more = [pid for pid in _family(pids[0]) if pid not in pids]
        if not more:
            return pids
        _signal_all(more, signal.SIGSTOP)
        pids += more


def _hang_until_noticed(server: Any, logs: list[Path]) -> float:
    """Keep the server hung until a worker logs a call that timed out on it; the seconds it took.

    Fails (after HANG_LIMIT_S) when no worker's call noticed the hang: it was not exercised.
    """
    offsets = [log.stat().st_size for log in logs]

    def noticed() -> bool:
        return any(HANG_NOTICED.search(log.read_bytes()[offset:].decode(errors="replace"))
                   for log, offset in zip(logs, offsets))

    started = time.monotonic()
    pids = _freeze(server)
    try:
        wait_for(f"a worker's database call to time out on the hung server (hung {HANG_LIMIT_S} s; "
                 "no call noticed the hang)", noticed, timeout=HANG_LIMIT_S, interval=0.1)
        time.sleep(1)  # the others' calls (and reconnections) time out too
    finally:
        _signal_all(pids, signal.SIGCONT)
    return time.monotonic() - started


@pytest.mark.server
def test_outage_and_hang_longer_than_the_retry_window_lose_no_trial(
    server_database: ServerDatabase, tmp_path: Path
) -> None:
    """Stopped past the retry window and the grace period, then hung until a call timed
    out on it: every trial in flight is reported when the server is back, none FAILs,
    and exactly the budget's trials finish."""
    url, name, budget = server_database.url, "faults", 6
    create_study(url, name, write_speech_data(tmp_path / "data"), overrides=["training.num_epochs=2"],
                 whitelist=["training.learning_rate"], num_trials=budget)
    args = ("--objective", "sleep", "--sleep-seconds", "2", "--sampler", "random",
            "--heartbeat-interval", "1", "--grace-period", "2")
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [_start(url, name, tmp_path, log, *args, "--seed", str(i)) for i, log in enumerate(logs)]

    try:
        with opened_study(url, name) as study:  # one connection for all the polling

            def states() -> Counter[str]:
                return Counter(t.state.name for t in study.get_trials(deepcopy=False))

            wait_for("three trials running", lambda: states()["RUNNING"] == 3, timeout=60, interval=0.1)
            server_database.server.stop_for(RETRY_WINDOW_S + 3).join()  # past the window and the grace
            wait_for("three more trials started", lambda: states()["COMPLETE"] >= 3, timeout=60, interval=0.1)
            # Three trials of 2 s are being claimed or run now: their claims and reports wait on it.
            _hang_until_noticed(server_database.server, logs)
        codes = [proc.wait(timeout=120) for proc in procs]
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *(log.read_text() for log in logs)])) from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text() for log in logs]
    for code, output in zip(codes, outputs):
        assert code == 0, output
        assert "Traceback" not in output and TEST_DB_PASSWORD not in output, output
    final = trial_states(url, name)
    # No trial lost, none FAIL, none past the budget.
    assert final == Counter({"COMPLETE": budget}), "\n".join([str(final), *outputs])
    joined = "\n".join(outputs)
    # The wait is logged: one line when it starts (per call that waited), one when it ends.
    assert "unreachable (connection refused" in joined or "unreachable (the server" in joined, joined
    assert "retrying until it is back" in joined and "reachable again after" in joined, joined
    assert HANG_NOTICED.search(joined), joined


def _train_worker(url: str, name: str, cwd: Path, log: Path, ckpt: str, *extra: str) -> subprocess.Popen[bytes]:
    return _start(url, name, cwd, log, "--sampler", "random", "--seed", "0", "--threads", "1",
                  "--ckpt-dir", ckpt, "--keep-models", "--verbose", *extra)


@pytest.mark.server
def test_workers_with_other_heartbeat_options_share_the_study_rule(
    server_database: ServerDatabase, tmp_path: Path
) -> None:
    """A trains with the default heartbeat (30 s); B is given 1 s and a 2 s grace period.
    B follows the study's rule (A's) with a warning, so A's live trial is never taken."""
    url, name = server_database.url, "rule"
    data = write_speech_data(tmp_path / "data", 30, min_frames=20, max_frames=60)
    create_study(url, name, data, overrides=[*TINY_MODEL, "training.num_epochs=4"],
                 whitelist=["training.learning_rate"], num_trials=1, pruner="none")
    a = _train_worker(url, name, tmp_path, tmp_path / "a.log", "ckA")
    try:
        with opened_study(url, name) as study:

            def claimed() -> bool:  # B takes longer to start than its grace period
                return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

            wait_for("A's trial", claimed, timeout=120, interval=0.1)
        b = _train_worker(url, name, tmp_path, tmp_path / "b.log", "ckB",
                          "--heartbeat-interval", "1", "--grace-period", "2")
        codes = [b.wait(timeout=120), a.wait(timeout=120)]
    finally:
        for proc in (a, locals().get("b")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    out_a, out_b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert codes == [0, 0], (out_a, out_b)
    for output in (out_a, out_b):
        assert "Traceback" not in output, output
    writers = [d for d in ("ckA", "ckB") if (tmp_path / d / name / "trial-0").exists()]
    assert writers == ["ckA"], (writers, out_a, out_b)
    warnings = [line for line in out_b.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "its own rule" in warnings[0], out_b
    assert "every remaining slot of the 1-trial budget is claimed" in out_b, out_b
    assert trial_states(url, name) == Counter({"COMPLETE": 1}), (out_a, out_b)
    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        study, _ = load_study(storage, name, url)
        assert storage.get_study_system_attrs(study._study_id)[HEARTBEAT_ATTR] == {
            "interval": 30, "grace_period": 60
        }


@pytest.fixture
def one_torch_thread() -> Any:
    """In-process training on one thread, as `optim run --threads 1` (2 shared cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_worker_whose_trial_is_taken_over_stops_it_without_writing(tmp_path: Path, one_torch_thread: Any) -> None:
    """Another worker fails the trial as stale and re-queues it mid-training: its worker
    says so in one line, writes nothing more to the trial's dir, and ends normally."""
    url, name = f"sqlite:///{tmp_path / 'optim.db'}", "taken"
    data = write_speech_data(tmp_path / "data", 40, min_frames=20, max_frames=60)
    create_study(url, name, data, overrides=[*TINY_MODEL, "training.num_epochs=4"],
                 whitelist=["training.learning_rate"], num_trials=1, pruner="none")
    trial_dir = tmp_path / "ckpt" / name / "trial-0"
    epoch_one = threading.Event()
    taken: dict[str, Any] = {}

    def files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in trial_dir.iterdir()}

    def take_over() -> None:  # what a worker with a shorter rule did before the fix
        epoch_one.wait(timeout=120)
        with storage_session(url, heartbeat_interval=None, create=False) as storage:
            study, spec = load_study(storage, name, url)
            claims = Claims(storage, study, spec, None, 3, lambda _m: None)
            claims.give_back(study.get_trials(deepcopy=False)[0]._trial_id)
        taken["files"] = files()

    lines: list[str] = []

    def log(line: str) -> None:
        if "epoch 1/" in line:
            epoch_one.set()
        if "taken over" in line:
            taken["after"] = files()
        lines.append(line)

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    options = WorkerOptions(objective="train", ckpt_dir=tmp_path / "ckpt", keep_models=True,
                            heartbeat_interval=1, grace_period=2, seed=0, n_trials=1, verbose=True)
    summary = run_worker(url, name, options, log=log)
    thread.join(timeout=10)
    assert summary.counts["LOST"] == 1 and summary.exit_code() == 0, (summary.counts, lines)
    lost = [line for line in lines if "taken over" in line]
    assert len(lost) == 1 and "without writing its checkpoint dir" in lost[0], lines
    assert taken["after"] == taken["files"]  # not one write after the takeover
    with opened_study(url, name) as study:
        assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]


@pytest.mark.server
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_trial_failing_for_its_machine_is_retried_elsewhere(
    backend: str, make_storage_url: Any, tmp_path: Path, one_torch_thread: Any
) -> None:
    """Worker A's checkpoint dir cannot be created (an OSError): its trial is handed
    back and A stops in one line; worker B runs the retry to COMPLETE."""
    url, name = make_storage_url(backend), "infra"
    data = write_speech_data(tmp_path / "data")
    create_study(url, name, data, overrides=[*TINY_MODEL, "training.num_epochs=1"],
                 whitelist=["training.learning_rate"], num_trials=1, pruner="none")
    (tmp_path / "bad").mkdir()  # the study's checkpoint dir: a link to a mount that is gone
    (tmp_path / "bad" / name).symlink_to(tmp_path / "unmounted" / name)
    options = WorkerOptions(objective="train", ckpt_dir=tmp_path / "bad", seed=0)
    with pytest.raises(StagetuneError, match=r"trial 0 failed on this worker for an infrastructure reason .*"
                       r"handed back for retry on another worker"):
        run_worker(url, name, options, log=lambda _m: None)
    assert trial_states(url, name) == Counter({"FAIL": 1, "WAITING": 1})
    options = WorkerOptions(objective="train", ckpt_dir=tmp_path / "ckpt", seed=0)
    summary = run_worker(url, name, options, log=lambda _m: None)
    assert summary.counts["COMPLETE"] == 1, summary.counts
    with opened_study(url, name) as study:
        trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and "File exists" in trials[0].user_attrs["fail_reason"]


def test_infrastructure_failures_are_told_from_model_failures() -> None:
    import sqlalchemy.exc

    disk_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    for exc in (disk_full, wrapped, PermissionError("ckpt"), sqlalchemy.exc.OperationalError("x", {}, Exception("y")),
                optuna.exceptions.StorageInternalError("z")):
        assert infrastructure_failure(exc), exc
    for exc in (ValueError("bad config"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                StagetuneError("holds a checkpoint trained with another config")):
        assert not infrastructure_failure(exc), exc


def test_a_report_the_server_ran_after_the_client_gave_up_is_not_a_lost_trial(tmp_path: Path) -> None:
    """A hung server may run a report's COMMIT after the client's read timeout: the retried
    report then finds the trial finished, as this worker reported it, and must count it, not
    call it taken over. A trial finished otherwise (another value, or failed as stale) was."""
    from stagetune.optim.rdb import STALE_ATTR
    from stagetune.optim.worker import _Worker

    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "landed", write_speech_data(tmp_path / "data"), num_trials=3)
    with storage_session(url) as storage:
        worker = _Worker(storage, url, "landed", WorkerOptions(), None, log=lambda _line: None)
        study = optuna.load_study(study_name="landed", storage=storage)
        done, other, stale = study.ask(), study.ask(), study.ask()
        study.tell(done, 0.5)
        study.tell(other, 0.9)
        storage.set_trial_system_attr(stale._trial_id, STALE_ATTR, stale._trial_id)
        study.tell(stale, state=TrialState.FAIL)
        assert worker._report_landed(done, TrialState.COMPLETE, 0.5)
        assert not worker._report_landed(other, TrialState.COMPLETE, 0.5)
        assert not worker._report_landed(stale, TrialState.FAIL, None)
