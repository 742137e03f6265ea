"""``optim status``: trials by state, budget progress, best trial, running trials."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from stagetune.optim.budget import heartbeat_ages
from stagetune.optim.metrics import METRICS
from stagetune.optim.spec import StudySpec

__all__ = ["study_status", "format_status"]


def study_status(
    study: optuna.Study, spec: StudySpec, storage: optuna.storages.RDBStorage | None = None
) -> dict[str, Any]:
    """A JSON-serialisable summary of the study (heartbeats need the RDB ``storage``)."""
    trials = study.get_trials(deepcopy=False)
    by_state = {s.name: 0 for s in TrialState}
    for t in trials:
        by_state[t.state.name] += 1
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    ages = heartbeat_ages(storage, study._study_id) if storage is not None else {}
    running = [
        {
            "number": t.number,
            "epoch": t.user_attrs.get("epoch", 0),
            "last_value": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
            "heartbeat_age_s": round(ages[t.number], 1) if t.number in ages else None,
        }
        for t in trials
        if t.state == TrialState.RUNNING
    ]
    return {
        "study": study.study_name,
        "parent_study": spec.parent_study,
        "metric": spec.metric,
        "states": by_state,
        "finished": finished,
        "num_trials": spec.num_trials,
        "budget_met": spec.num_trials is not None and finished >= spec.num_trials,
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params},
        "running": running,
        "tuned": spec.tuned,
    }


def format_status(status: dict[str, Any]) -> str:
    """Human-readable lines."""
    states = ", ".join(f"{v} {k}" for k, v in status["states"].items() if v)
    budget = status["num_trials"]
    lines = [
        f"study {status['study']}" + (f" (from {status['parent_study']})" if status["parent_study"] else ""),
        f"metric: {status['metric']}",
        f"trials: {states or 'none'}",
        f"budget: {status['finished']}/{budget if budget is not None else 'unlimited'} finished"
        + (" (met)" if status["budget_met"] else ""),
    ]
    best = status["best"]
    lines.append(f"best: {best['value']:.6g} (trial {best['number']})" if best else "best: none yet")
    for r in status["running"]:
        age = f"{r['heartbeat_age_s']:.0f} s ago" if r["heartbeat_age_s"] is not None else "none"
        label = METRICS[status["metric"]].label
        err = f", {label} {r['last_value']:.4g}" if r["last_value"] is not None else ""
        lines.append(f"running: trial {r['number']} epoch {r['epoch']}{err}, heartbeat {age}")
    return "\n".join(lines) + "\n"
