"""``optim status``: trials by state, budget progress, best trial, running trials.

Optuna knows one state for a trial that ended without a result, FAIL. Status tells
three kinds apart, as they mean different things to the user:

* handed back: its worker was stopped (SIGTERM/SIGINT) and queued a retry, which
  resumes from its checkpoint;
* stale: its worker died (no heartbeat for the grace period, or cut off while
  claiming it); the next worker failed it and, retries permitting, queued a retry;
* failed: the trial itself failed (an error in training), or ran out of retries.
"""

from __future__ import annotations

import datetime
import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import DateTime, text

from stagetune.optim.budget import beating_trials, count_by_state, heartbeat_ages
from stagetune.optim.metrics import METRICS
from stagetune.optim.optuna_internals import (
    TRIAL_VALUES,
    TRIALS,
    DbState,
    study_id_of,
    trial_id_of,
    trials_with_system_attrs,
)
from stagetune.optim.rdb import STALE_ATTR
from stagetune.optim.spec import StudySpec

__all__ = ["FAIL_KINDS", "study_status", "format_status", "fail_kinds", "estimate_finish"]

#: The finished trials whose mean duration estimates the time left (the latest ones).
_RECENT = 20

#: The kinds of FAIL trials, as ``study_status(...)["fail_kinds"]`` counts them and
#: ``format_status`` labels them.
FAIL_KINDS = {"handed_back": "handed back", "stale": "stale", "failed": "FAIL"}


def fail_kinds(trials: list[FrozenTrial], beating: set[int] | None = None) -> dict[int, str]:
    """The kind (a key of :data:`FAIL_KINDS`) of each FAIL trial, by trial number.

    Args:
        trials: All trials of the study (retries name the trials they retry).
        beating: Numbers of the trials that ever recorded a heartbeat (None: all did).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        requeued = {
            number
            for t in trials
            for number in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
        }
    kinds: dict[int, str] = {}
    for t in trials:
        if t.state != TrialState.FAIL:
            continue
        never_beat = beating is not None and t.number not in beating
        if t.system_attrs.get(STALE_ATTR) == trial_id_of(t) or (t.number in requeued and never_beat):
            kinds[t.number] = "stale"
        elif t.number in requeued:
            kinds[t.number] = "handed_back"
        else:
            kinds[t.number] = "failed"
    return kinds


def study_status(study: optuna.Study, spec: StudySpec, storage: optuna.storages.RDBStorage) -> dict[str, Any]:
    """A JSON-serialisable summary of the study, read from ``storage`` (its RDB storage).

    Light reads only, so that status stays quick on a study of thousands of trials:
    counts by state, the best trial, the running trials, the latest finished ones'
    times and what tells failures apart (:func:`fail_kinds`); never every trial
    through optuna's full loading.
    """
    sid = study_id_of(study)
    counts = count_by_state(storage, sid)
    by_state = {s.name: counts.get(s.name, 0) for s in TrialState}
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    best = _best(storage, sid) if by_state["COMPLETE"] else None
    ages = heartbeat_ages(storage, sid)
    kinds = dict.fromkeys(FAIL_KINDS, 0)
    if by_state["FAIL"]:
        for kind in fail_kinds(trials_with_system_attrs(storage, sid), beating_trials(storage, sid)).values():
            kinds[kind] += 1
    running_trials = [storage.get_trial(trial_id) for trial_id in _running_ids(storage, sid)]
    running = [
        {
            "number": t.number,
            "epoch": t.user_attrs.get("epoch", 0),
            "last_value": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
            "heartbeat_age_s": round(ages[t.number], 1) if t.number in ages else None,
        }
        for t in running_trials
    ]
    done, recent = _finished_times(storage, sid)
    starts = [t.datetime_start for t in running_trials if t.datetime_start is not None]
    return {
        "study": study.study_name,
        "eta": _estimate(done, recent, starts, spec.num_trials),
        "parent_study": spec.parent_study,
        "metric": spec.metric,
        "states": by_state,
        "fail_kinds": kinds,
        "finished": finished,
        "num_trials": spec.num_trials,
        "budget_met": spec.num_trials is not None and finished >= spec.num_trials,
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params},
        "running": running,
        "tuned": spec.tuned,
    }


def _best(storage: optuna.storages.RDBStorage, study_id: int) -> FrozenTrial:
    """The best COMPLETE trial (lowest value; of equal values, the first): two queries."""
    best = storage.get_best_trial(study_id)  # optuna's order: -inf, finite values, +inf
    if best.value is None or not math.isfinite(best.value):
        return best
    query = (
        f"SELECT MIN(t.number) FROM {TRIALS} t JOIN {TRIAL_VALUES} v ON v.trial_id = t.trial_id "
        f"WHERE t.study_id = :sid AND t.state = '{DbState.COMPLETE}' AND v.objective = 0 AND v.value = :value"
    )
    with storage.engine.connect() as conn:
        first = conn.execute(text(query), {"sid": study_id, "value": best.value}).scalar()
    if first is None or first == best.number:
        return best
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, first))


def _running_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    query = f"SELECT trial_id FROM {TRIALS} WHERE study_id = :sid AND state = '{DbState.RUNNING}' ORDER BY number"
    with storage.engine.connect() as conn:
        return [int(trial_id) for trial_id in conn.execute(text(query), {"sid": study_id}).scalars()]


def _finished_times(
    storage: optuna.storages.RDBStorage, study_id: int
) -> tuple[int, list[tuple[datetime.datetime, datetime.datetime]]]:
    """How many finished trials have both times, and the (start, complete) of the latest :data:`_RECENT`."""
    where = (
        f"FROM {TRIALS} WHERE study_id = :sid AND state IN ('{DbState.COMPLETE}', '{DbState.PRUNED}') "
        "AND datetime_start IS NOT NULL AND datetime_complete IS NOT NULL"
    )
    recent = text(
        f"SELECT datetime_start AS datetime_start, datetime_complete AS datetime_complete {where} "
        f"ORDER BY datetime_complete DESC LIMIT {_RECENT}"
    ).columns(datetime_start=DateTime, datetime_complete=DateTime)  # SQLite returns text otherwise
    with storage.engine.connect() as conn:
        done = int(conn.execute(text(f"SELECT COUNT(*) {where}"), {"sid": study_id}).scalar())
        rows = conn.execute(recent, {"sid": study_id}).all()
    return done, [(start, complete) for start, complete in rows]


def estimate_finish(
    trials: list[FrozenTrial], budget: int | None, now: datetime.datetime | None = None
) -> dict[str, Any] | None:
    """The time left to finish the budget, at the pace of the latest finished trials.

    ``{"seconds", "left", "running", "trial_s"}``: the trials still to finish, those
    running (the workers, as far as the study knows), and the mean seconds per trial
    of the latest :data:`_RECENT` finished ones; ``seconds`` is None while nothing
    runs.  None without a budget, once it is met, or before any trial finished.
    """
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and t.datetime_start is not None and t.datetime_complete is not None]
    recent = [(t.datetime_start, t.datetime_complete) for t in finished]
    running = [t.datetime_start for t in trials if t.state == TrialState.RUNNING and t.datetime_start is not None]
    return _estimate(len(finished), recent, running, budget, now)


def _estimate(
    done: int,
    recent: list[tuple[datetime.datetime, datetime.datetime]],
    running: list[datetime.datetime],
    budget: int | None,
    now: datetime.datetime | None = None,
) -> dict[str, Any] | None:
    """:func:`estimate_finish` of ``done`` finished trials, some of their (start, complete) times
    (the latest :data:`_RECENT` are used) and the running trials' start times."""
    if budget is None or not done or done >= budget:
        return None
    recent = sorted(recent, key=lambda times: times[1])[-_RECENT:]
    per_trial = sum((complete - start).total_seconds() for start, complete in recent) / len(recent)
    left = budget - done
    now = now or datetime.datetime.now()
    seconds = None
    if running:
        # The running trials' rest, then the others, shared by as many workers.
        work = sum(max(per_trial - (now - start).total_seconds(), 0.0) for start in running)
        work += max(left - len(running), 0) * per_trial
        seconds = round(work / len(running), 1)
    return {"seconds": seconds, "left": left, "running": len(running), "trial_s": round(per_trial, 1)}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_status(status: dict[str, Any]) -> str:
    """Human-readable lines."""
    counts: dict[str, int] = {}
    for state, n in status["states"].items():
        if state == "FAIL" and "fail_kinds" in status:  # a FAIL trial may be no failure
            counts.update({FAIL_KINDS[kind]: m for kind, m in status["fail_kinds"].items()})
        else:
            counts[state] = n
    states = ", ".join(f"{n} {label}" for label, n in counts.items() if n)
    budget = status["num_trials"]
    lines = [
        f"study {status['study']}" + (f" (from {status['parent_study']})" if status["parent_study"] else ""),
        f"metric: {status['metric']}",
        f"trials: {states or 'none'}",
        f"budget: {status['finished']}/{budget if budget is not None else 'unlimited'} finished"
        + (" (met)" if status["budget_met"] else ""),
    ]
    eta = status.get("eta")
    if eta is not None:
        pace = f"{eta['left']} to finish, {eta['running']} running, {_duration(eta['trial_s'])} per trial"
        when = f"about {_duration(eta['seconds'])}" if eta["seconds"] is not None else "unknown (no trial running)"
        lines.append(f"time left: {when} ({pace})")
    best = status["best"]
    lines.append(f"best: {best['value']:.6g} (trial {best['number']})" if best else "best: none yet")
    for r in status["running"]:
        age = f"{r['heartbeat_age_s']:.0f} s ago" if r["heartbeat_age_s"] is not None else "none"
        label = METRICS[status["metric"]].label
        err = f", {label} {r['last_value']:.4g}" if r["last_value"] is not None else ""
        lines.append(f"running: trial {r['number']} epoch {r['epoch']}{err}, heartbeat {age}")
    return "\n".join(lines) + "\n"
