"""``plan status``: every stage's study in one table, and the final model."""

from __future__ import annotations

import json
from typing import Any

from stagetune.errors import StagetuneError
from stagetune.optim.storage import mask_url
from stagetune.plan.runner import final_paths, stage_state
from stagetune.plan.spec import Plan

__all__ = ["plan_status"]

_TOP = 3


def _top_parameters(plan: Plan, stage_name: str) -> list[str]:
    """The most important parameters of a finished stage (none while importance is undefined)."""
    from stagetune.optim.analysis import rank_parameters
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    with storage_session(plan.url, heartbeat_interval=None, create=False) as storage:
        study, _ = load_study(storage, plan.study_name(stage_name), plan.url)
        try:
            ranking = rank_parameters(study)
        except StagetuneError:  # too few trials, or all tied
            return []
    return [name for name, _ in ranking[:_TOP]]


def plan_status(plan: Plan) -> dict[str, Any]:
    """JSON-serialisable: ``{"plan", "url", "stages": [...], "final"}``."""
    stages = []
    for stage in plan.stages:
        state = stage_state(plan, stage)
        row: dict[str, Any] = {"stage": stage.name, "study": plan.study_name(stage.name), "from": stage.parent,
                               "budget": stage.trials, "finished": 0, "best_value": None, "best_trial": None,
                               "top_parameters": []}
        if state is None:
            row["state"] = "not started"
        else:
            row["finished"] = state["finished"]
            row["state"] = "done" if state["budget_met"] else ("running" if state["running"] else "waiting")
            if state["best"] is not None:
                row["best_value"], row["best_trial"] = state["best"]["value"], state["best"]["number"]
            if state["budget_met"]:
                row["top_parameters"] = _top_parameters(plan, stage.name)
        stages.append(row)
    final = None
    if plan.final is not None:
        result = final_paths(plan)["result"]
        final = {"stage": plan.final, "state": "not trained"}
        if result.exists():
            done = json.loads(result.read_text())
            final.update(state="trained", model=done["model"], trial=done["trial"],
                         test_error=(done.get("test") or {}).get("rate"))
    return {"plan": plan.name, "url": mask_url(plan.url), "stages": stages, "final": final}
