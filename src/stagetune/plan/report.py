"""``plan report``: every stage's study report, and the stages side by side.

``OUT_DIR/index.html`` has the stage table (state, trials against the budget,
best value and trial, top parameters), ``stages.png`` (best value and budget per
stage) and one section per stage whose study exists; each such stage's figures
and ``report.json`` are in ``OUT_DIR/STAGE/``, as ``optim report`` writes them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from stagetune.optim.report import REPORT_JSON, html_page, html_section, study_report, write_study_report
from stagetune.plan.spec import Plan
from stagetune.plan.status import plan_status

__all__ = ["plan_report", "write_plan_report"]


def plan_report(plan: Plan, *, evaluator: str = "ped-anova") -> dict[str, Any]:
    """The plan's status table, and the report data of each stage whose study exists."""
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    table = plan_status(plan)
    reports: dict[str, Any] = {}
    started = [row["stage"] for row in table["stages"] if row["state"] != "not started"]
    if started:
        with storage_session(plan.url, heartbeat_interval=None, create=False) as storage:
            for stage in started:
                study, spec = load_study(storage, plan.study_name(stage), plan.url, same_release=False)
                reports[stage] = study_report(study, spec, storage, evaluator=evaluator)
    return {"plan": table, "stages": reports}


def write_plan_report(data: dict[str, Any], out: Path) -> None:
    """``stages.png``, ``report.json``, ``index.html`` and a directory per started stage into ``out``."""
    from stagetune.optim.report_figures import draw_stages

    table = data["plan"]
    rows = table["stages"]
    draw_stages(rows, out / "stages.png")
    esc = html.escape
    head = ("stage", "from", "state", "trials", "best value", "best trial", "top parameters")
    body = ['<table class="summary"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = (r["stage"], r["from"] or "-", r["state"], f"{r['finished']}/{r['budget']}",
                 "-" if r["best_value"] is None else f"{r['best_value']:.6g}",
                 "-" if r["best_trial"] is None else str(r["best_trial"]), ", ".join(r["top_parameters"]) or "-")
        body.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    body.append("</table>")
    body.append('<img src="stages.png" alt="Stages side by side">')
    for stage, report in data["stages"].items():
        (out / stage).mkdir()
        write_study_report(report, out / stage)
        body.append(f'<h2 id="{esc(stage)}">Stage {esc(stage)}</h2>')
        body.append(html_section(report, prefix=f"{stage}/"))
    (out / REPORT_JSON).write_text(json.dumps(
        {"plan": table, "stages": {s: f"{s}/{REPORT_JSON}" for s in data["stages"]}}, default=str) + "\n")
    (out / "index.html").write_text(html_page(f"stagetune plan {table['plan']}", "\n".join(body)))
