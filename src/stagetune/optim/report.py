"""``optim report``: a study's figures as PNGs, their data in ``report.json``, and ``index.html``.

:func:`study_report` reads the study once and returns the data of every figure
(JSON-serialisable; what the tests check); :func:`render_report` draws it into
a directory (:mod:`stagetune.optim.report_figures`) with an ``index.html``
holding a summary table; :func:`write_report_dir` makes that directory appear
whole or not at all.  File names are fixed (:data:`FIGURES`).

Trials carry what the figures need: the worker that ran them (user attribute
:data:`WORKER_ATTR`, written when a worker starts a trial; trials from before it
are packed into rows of their own), their measured training-step bytes
(``mem_bytes``) and their per-epoch values (intermediate values).
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.metrics import METRICS
from stagetune.optim.spec import StudySpec

__all__ = ["WORKER_ATTR", "MEM_ATTR", "FIGURES", "REPORT_JSON", "study_report", "render_report",
           "write_report_dir", "check_out_dir", "summary_rows"]

#: Trial user attribute naming the worker (``host:pid``) that ran the trial.
WORKER_ATTR = "worker"
#: Trial user attribute with the measured training-step bytes (set by the train objective).
MEM_ATTR = "mem_bytes"
#: Figure key -> file name (the same for every study).
FIGURES = {
    "history": "history.png",
    "importance": "importance.png",
    "curves": "learning_curves.png",
    "parallel": "parallel_coordinates.png",
    "memory": "memory.png",
    "timeline": "timeline.png",
}
REPORT_JSON = "report.json"
_TOP_PARAMS = 6


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def study_report(
    study: optuna.Study,
    spec: StudySpec,
    storage: optuna.storages.RDBStorage,
    *,
    evaluator: str = "ped-anova",
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The data of every figure and the summary, read from the study once."""
    from stagetune.optim.analysis import completed_in_memory, rank_parameters
    from stagetune.optim.status import study_status

    trials = study.get_trials(deepcopy=False)
    now = now or datetime.datetime.now()
    status = study_status(study, spec, storage)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    figures: dict[str, Any] = {"history": _history(complete)}
    try:
        ranking = rank_parameters(completed_in_memory(storage, study), evaluator=evaluator)
        figures["importance"] = {"evaluator": evaluator, "importances": dict(ranking)}
    except StagetuneError as exc:  # too few trials, nothing varies, all tied
        ranking = []
        figures["importance"] = {"evaluator": evaluator, "skipped": str(exc)}
    figures["curves"] = _curves(trials)
    figures["parallel"] = _parallel(complete, [n for n, _ in ranking] or _varying(complete, spec))
    figures["memory"] = _memory(trials, spec)
    figures["timeline"] = _timeline(trials, now)
    if not complete:
        figures["history"]["skipped"] = "no completed trial yet"
    return {
        "study": study.study_name,
        "metric": spec.metric,
        "label": METRICS[spec.metric].label,
        "generated": now.isoformat(timespec="seconds"),
        "summary": {**status, "pruner": spec.pruner, "sampler": spec.sampler_name(),
                    "mem_limit_bytes": spec.mem_limit_bytes, "train_dir": spec.train_dir},
        "figures": figures,
    }


def _history(complete: list[FrozenTrial]) -> dict[str, Any]:
    points, best, best_so_far = [], math.inf, []
    for t in sorted(complete, key=lambda t: t.number):
        points.append([t.number, t.value])
        if t.value < best:
            best = t.value
        best_so_far.append([t.number, best])
    return {"trials": points, "best_so_far": best_so_far}


def _curves(trials: list[FrozenTrial]) -> dict[str, Any]:
    curves = []
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        curves.append({"number": t.number, "state": t.state.name, "steps": steps,
                       "values": [t.intermediate_values[s] for s in steps],
                       "pruned": t.state == TrialState.PRUNED})
    data: dict[str, Any] = {"curves": curves}
    if not curves:
        data["skipped"] = "no trial reported a value per epoch"
    return data


def _varying(complete: list[FrozenTrial], spec: StudySpec) -> list[str]:
    return [n for n in spec.tuned if len({repr(t.params.get(n)) for t in complete if n in t.params}) > 1]


def _scale(value: Any, dist: Any) -> float:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices.index(value) / max(len(dist.choices) - 1, 1)
    low, high, v = float(dist.low), float(dist.high), float(value)
    if getattr(dist, "log", False):
        low, high, v = math.log(low), math.log(high), math.log(v)
    return 0.5 if high == low else (v - low) / (high - low)


def _parallel(complete: list[FrozenTrial], ranked: list[str]) -> dict[str, Any]:
    names = ranked[:_TOP_PARAMS]
    rows = [t for t in complete if all(n in t.params for n in names)]
    values = [t.value for t in rows]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    trials = []
    for t in rows:
        scaled = [_scale(t.params[n], t.distributions[n]) for n in names]
        scaled.append(0.5 if high == low else (t.value - low) / (high - low))
        trials.append({"number": t.number, "value": t.value, "params": {n: t.params[n] for n in names},
                       "scaled": scaled})
    data: dict[str, Any] = {"params": names, "trials": trials}
    if not names or not trials:
        data["skipped"] = "no completed trial with a varying parameter yet"
    return data


def _memory(trials: list[FrozenTrial], spec: StudySpec) -> dict[str, Any]:
    points = []
    for t in trials:
        if MEM_ATTR not in t.user_attrs:
            continue
        value = t.value if t.state == TrialState.COMPLETE else (
            min(t.intermediate_values.values()) if t.intermediate_values else None
        )
        points.append({"number": t.number, "state": t.state.name, "mem_bytes": int(t.user_attrs[MEM_ATTR]),
                       "value": value})
    data: dict[str, Any] = {"limit_bytes": spec.mem_limit_bytes, "points": points}
    if not points:
        data["skipped"] = "no trial measured its memory (the study has no --mem-limit-bytes)"
    return data


def _timeline(trials: list[FrozenTrial], now: datetime.datetime) -> dict[str, Any]:
    started = sorted((t for t in trials if t.datetime_start is not None),
                     key=lambda t: (t.datetime_start, t.number))
    if not started:
        return {"origin": None, "workers": [], "bars": [], "skipped": "no trial has started"}
    origin = started[0].datetime_start
    bars, lanes_free = [], []  # lanes_free: end time of each row of trials without a worker
    for t in started:
        end = t.datetime_complete or now
        worker = t.user_attrs.get(WORKER_ATTR)
        if worker is None:  # recorded before workers named themselves: first free row
            lane = next((i for i, free in enumerate(lanes_free) if free <= t.datetime_start), len(lanes_free))
            if lane == len(lanes_free):
                lanes_free.append(end)
            lanes_free[lane] = end
            worker = f"unnamed {lane + 1}"
        bars.append({
            "number": t.number, "worker": str(worker), "state": t.state.name,
            "start": _iso(t.datetime_start), "end": _iso(t.datetime_complete),
            "start_s": (t.datetime_start - origin).total_seconds(), "end_s": (end - origin).total_seconds(),
        })
    workers = sorted({b["worker"] for b in bars}, key=lambda w: min(b["start_s"] for b in bars if b["worker"] == w))
    return {"origin": _iso(origin), "workers": workers, "bars": bars}


def render_report(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Draw the figures of ``report`` into the directory ``out``; figure key -> file name."""
    from stagetune.optim import report_figures as draw

    label = report["label"]
    figs = report["figures"]
    drawers: dict[str, Callable[[dict[str, Any], Path], None]] = {
        "history": lambda d, p: draw.draw_history(d, p, label),
        "importance": draw.draw_importance,
        "curves": lambda d, p: draw.draw_curves(d, p, label),
        "parallel": lambda d, p: draw.draw_parallel(d, p, label),
        "memory": lambda d, p: draw.draw_memory(d, p, label),
        "timeline": draw.draw_timeline,
    }
    written = {}
    for key, name in FIGURES.items():
        data = figs[key]
        if "skipped" in data:
            data["file"] = None
            continue
        drawers[key](data, out / name)
        data["file"] = written[key] = name
    return written


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table: (what, value) rows."""
    s = report["summary"]
    states = ", ".join(f"{n} {k}" for k, n in s["states"].items() if n) or "none"
    best = s["best"]
    rows = [
        ("study", report["study"] + (f" (from {s['parent_study']})" if s["parent_study"] else "")),
        ("metric", f"{report['metric']} ({report['label']})"),
        ("trials", states),
        ("budget", f"{s['finished']}/{s['num_trials'] if s['num_trials'] is not None else 'unlimited'} finished"
                   + (" (met)" if s["budget_met"] else "")),
        ("best", "none yet" if best is None else f"{best['value']:.6g} (trial {best['number']})"),
    ]
    if best is not None:
        rows += [(f"best {k}", repr(v)) for k, v in best["params"].items()]
    rows += [
        ("tuned", ", ".join(s["tuned"]) or "nothing"),
        ("pruner", s["pruner"]),
        ("sampler", s["sampler"]),
        ("memory limit", "none" if s["mem_limit_bytes"] is None else f"{s['mem_limit_bytes']} bytes"),
        ("data", s["train_dir"]),
        ("generated", report["generated"]),
    ]
    return rows


_TITLES = {
    "history": "Best so far", "importance": "Parameter importances", "curves": "Learning curves",
    "parallel": "Parallel coordinates", "memory": "Memory footprint", "timeline": "Trials per worker",
}


def html_section(report: dict[str, Any], prefix: str = "") -> str:
    """The summary table and figures of one study (``prefix``: their directory in the page)."""
    esc = html.escape
    parts = ['<table class="summary">']
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary_rows(report)]
    parts.append("</table>")
    for key in FIGURES:
        data = report["figures"][key]
        title = _TITLES[key]
        if key == "importance" and "evaluator" in data:
            title += f" ({data['evaluator']})"
        parts.append(f"<h3>{esc(title)}</h3>")
        if data.get("file"):
            parts.append(f'<img src="{esc(prefix + data["file"])}" alt="{esc(title)}">')
        else:
            parts.append(f'<p class="note">skipped: {esc(data["skipped"])}</p>')
    return "\n".join(parts)


def html_page(title: str, body: str) -> str:
    """A self-contained page (no scripts, no external files)."""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}"
        ".note{color:#777}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_study_report(report: dict[str, Any], out: Path) -> None:
    """Figures, ``report.json`` and ``index.html`` of one study into the directory ``out``."""
    render_report(report, out)
    (out / REPORT_JSON).write_text(json.dumps(report, separators=(",", ":"), default=str) + "\n")
    (out / "index.html").write_text(html_page(f"stagetune study {report['study']}", html_section(report)))


def check_out_dir(out: str | Path) -> Path:
    """``OUT_DIR`` as a path: new, empty, or an earlier report (which is replaced).

    Raises:
        UsageError: It is a file, or a directory holding something else.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"OUT_DIR {out} is a file; name a directory for the report")
    if path.is_dir() and any(path.iterdir()) and not (path / REPORT_JSON).exists():
        raise UsageError(f"OUT_DIR {out} holds files but no stagetune report; name a new or empty directory")
    return path


def write_report_dir(out: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp)`` on a fresh directory beside ``out``, then put it in ``out``'s place.

    ``out`` is whole or unchanged: on any error the temporary directory goes.
    """
    out = Path(os.path.abspath(out))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    except OSError as exc:
        raise StagetuneError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
