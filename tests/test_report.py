"""``stagetune optim DB_URL report OUT_DIR``: figures, their data (report.json) and index.html."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from pathlib import Path

import optuna
import pytest
from optim_helpers import (
    assert_one_line_error, cli, cli_many, create_study, fill_study, opened_study, write_speech_data,
)
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from stagetune.optim.worker import WorkerOptions, run_worker

TUNED = [r"training\.(learning_rate|dropout_prob)|model\.recurrent_type"]
PNG = b"\x89PNG\r\n\x1a\n"
LIMIT = 50_000_000


def _trials(count: int, *, epochs: int = 4, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """Trials as two workers would leave them: learning curves, pruned ones, memory, start and end."""
    import random

    rng = random.Random(seed)
    dists = {
        "training.learning_rate": FloatDistribution(1e-5, 1e-1, log=True),
        "training.dropout_prob": FloatDistribution(0.0, 0.5),
        "model.recurrent_type": CategoricalDistribution(["lstm", "gru"]),
    }
    origin = datetime.datetime(2026, 1, 1, 12, 0, 0)
    ends = {"host:1": origin, "host:2": origin}
    trials = []
    for number in range(count):
        worker = f"host:{1 + number % 2}"
        start = ends[worker] + datetime.timedelta(seconds=rng.uniform(0.5, 3))  # an idle gap
        params = {"training.learning_rate": 10 ** rng.uniform(-5, -1), "training.dropout_prob": rng.uniform(0, 0.5),
                  "model.recurrent_type": rng.choice(["lstm", "gru"])}
        base = abs(params["training.learning_rate"] ** 0.1 - 0.6) + 0.1 * params["training.dropout_prob"]
        mem = rng.randint(10_000_000, 80_000_000)
        if mem > LIMIT:  # pruned before training: bytes, no value
            state, curve = TrialState.PRUNED, {}
        else:
            run = rng.randint(1, epochs) if number % 3 == 1 else epochs
            state = TrialState.PRUNED if run < epochs else TrialState.COMPLETE
            curve = {e: base + 0.5 / e for e in range(1, run + 1)}
        if number == count - 1:
            state, curve = TrialState.RUNNING, {1: base + 0.5}
        end = start + datetime.timedelta(seconds=rng.uniform(2, 10))
        ends[worker] = end
        trials.append(optuna.trial.create_trial(
            state=state, value=min(curve.values()) if state == TrialState.COMPLETE else None,
            params=params, distributions=dists, intermediate_values=curve,
            user_attrs={"worker": worker, "mem_bytes": mem},
        ))
        trials[-1].datetime_start = start
        trials[-1].datetime_complete = None if state == TrialState.RUNNING else end
    return trials


def _add_trials(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """``study.add_trials`` in one transaction (optuna's commits one per trial: a minute for 1,000)."""
    import json as _json

    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models as m
    from sqlalchemy.orm import Session

    storage = getattr(study._storage, "_backend", study._storage)  # under optuna's cache
    with Session(storage.engine) as session, session.begin():
        for number, t in enumerate(trials):
            row = m.TrialModel(number=number, study_id=study._study_id, state=t.state,
                               datetime_start=t.datetime_start, datetime_complete=t.datetime_complete)
            row.params = [m.TrialParamModel(param_name=k, param_value=t.distributions[k].to_internal_repr(v),
                                            distribution_json=distribution_to_json(t.distributions[k]))
                          for k, v in t.params.items()]
            if t.value is not None:
                row.values = [m.TrialValueModel(objective=0, value=t.value,
                                                value_type=m.TrialValueModel.TrialValueType.FINITE)]
            row.intermediate_values = [
                m.TrialIntermediateValueModel(
                    step=k, intermediate_value=v,
                    intermediate_value_type=m.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE)
                for k, v in t.intermediate_values.items()]
            row.user_attributes = [m.TrialUserAttributeModel(key=k, value_json=_json.dumps(v))
                                   for k, v in t.user_attrs.items()]
            session.add(row)


def _study(tmp_path: Path, count: int) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=TUNED, num_trials=count + 5,
                 mem_limit_bytes=LIMIT)
    with opened_study(url, "optim") as study:
        _add_trials(study, _trials(count))
        return url, study.get_trials()


def test_report_draws_every_figure_from_the_studys_data(tmp_path: Path) -> None:
    url, trials = _study(tmp_path, 24)
    out = tmp_path / "reports" / "optim"
    done = cli(["optim", url, "report", out], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report of study optim: {out / 'index.html'} (6 figures)"
    names = ["history.png", "importance.png", "learning_curves.png", "parallel_coordinates.png", "memory.png",
             "timeline.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "index.html", "report.json"])
    for name in names:
        assert (out / name).read_bytes().startswith(PNG), name
    page = (out / "index.html").read_text()
    assert all(f'<img src="{name}"' in page for name in names)
    assert "Parameter importances (ped-anova)" in page and "<th>budget</th><td>23/29 finished</td>" in page

    data = json.loads((out / "report.json").read_text())
    figs = data["figures"]
    # One learning curve per trial that reported values, exactly its values; pruned ones marked.
    reported = [t for t in trials if t.intermediate_values]
    assert [c["number"] for c in figs["curves"]["curves"]] == [t.number for t in reported]
    for curve, t in zip(figs["curves"]["curves"], reported):
        assert dict(zip(curve["steps"], curve["values"])) == t.intermediate_values
        assert curve["pruned"] == (t.state == TrialState.PRUNED) and curve["state"] == t.state.name
    assert any(c["pruned"] for c in figs["curves"]["curves"])
    # The timeline: a bar per started trial, on its worker's row, from its start to its end.
    bars = {b["number"]: b for b in figs["timeline"]["bars"]}
    assert figs["timeline"]["workers"] == ["host:1", "host:2"]
    for t in trials:
        bar = bars[t.number]
        assert (bar["worker"], bar["state"]) == (t.user_attrs["worker"], t.state.name)
        assert bar["start"] == t.datetime_start.isoformat()
        assert bar["end"] == (t.datetime_complete.isoformat() if t.datetime_complete else None)
        if t.datetime_complete:
            assert bar["end_s"] - bar["start_s"] == pytest.approx((t.datetime_complete - t.datetime_start).total_seconds())
    # Best so far, memory (every measured trial; those pruned over the limit have no value), importances.
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    assert figs["history"]["trials"] == [[t.number, t.value] for t in complete]
    assert figs["history"]["best_so_far"][-1] == [complete[-1].number, min(t.value for t in complete)]
    assert figs["memory"]["limit_bytes"] == LIMIT
    assert {p["number"]: p["mem_bytes"] for p in figs["memory"]["points"]} == {
        t.number: t.user_attrs["mem_bytes"] for t in trials}
    assert all(p["value"] is None for p in figs["memory"]["points"] if p["mem_bytes"] > LIMIT)
    assert figs["importance"]["evaluator"] == "ped-anova"
    assert sorted(figs["importance"]["importances"]) == sorted(trials[0].params)
    assert figs["parallel"]["params"] == list(figs["importance"]["importances"])
    assert len(figs["parallel"]["trials"]) == len(complete)
    assert data["summary"]["best"]["number"] == min(complete, key=lambda t: t.value).number

    # Again into the same directory: replaced whole, nothing left beside it.
    (out / "stale.png").write_bytes(PNG)
    again = cli(["optim", url, "report", out], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (out / "stale.png").exists() and sorted(p.name for p in out.parent.iterdir()) == ["optim"]
    again_figs = json.loads((out / "report.json").read_text())["figures"]
    assert all(again_figs[key] == figs[key] for key in ("history", "importance", "curves", "parallel", "memory"))


def test_report_refuses_a_foreign_directory_and_notes_skipped_figures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=TUNED, num_trials=1)
    # One trial run by a real worker: it names itself; one trial ranks nothing.
    run_worker(url, "optim", WorkerOptions(objective="quadratic", sampler="random", seed=0), log=lambda _m: None)
    with opened_study(url, "optim") as study:
        (trial,) = study.get_trials()
    assert trial.user_attrs["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused, done = cli_many([["optim", url, "report", mine], ["optim", url, "report", tmp_path / "out"]], tmp_path)
    assert_one_line_error(refused, "holds files but no stagetune report")
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert done.returncode == 0, done.stderr
    assert "skipped: importance, curves, parallel, memory" in done.stdout
    figs = json.loads((tmp_path / "out" / "report.json").read_text())["figures"]
    assert "1 completed trial" in figs["importance"]["skipped"] or "no parameter varies" in figs["importance"]["skipped"]
    assert figs["timeline"]["bars"][0]["worker"] == trial.user_attrs["worker"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert "skipped: " in page and 'src="importance.png"' not in page


def test_report_of_a_1000_trial_study_is_fast(tmp_path: Path) -> None:
    url, _ = _study(tmp_path, 1000)
    began = time.monotonic()
    done = cli(["optim", url, "report", tmp_path / "out"], tmp_path)
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    figs = json.loads((tmp_path / "out" / "report.json").read_text())["figures"]
    assert len(figs["timeline"]["bars"]) == 1000 and len(figs["curves"]["curves"]) > 500
    assert seconds < 40, seconds  # about 5 s on an idle core


def test_plan_report_has_a_section_per_started_stage_and_the_stages_side_by_side(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "train")
    (tmp_path / "out").mkdir()
    plan = tmp_path / "p.ini"
    plan.write_text(
        f"[plan]\ntrain = {data}\nout_dir = {tmp_path / 'out'}\n"
        "[sm]\nwhitelist = training\\.learning_rate training\\.dropout_prob model\\.recurrent_type\n"
        "trials = 12\nsampler = random\n[lg]\nfrom = sm\ntop_k = 1\ntrials = 4\n"
    )
    url = f"sqlite:///{tmp_path / 'out' / 'optim.db'}"
    spec = create_study(url, "p-sm", data, whitelist=TUNED, num_trials=12)
    best = fill_study(url, "p-sm", spec, 12)
    done = cli(["plan", plan, "report", tmp_path / "report"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report of plan p: {tmp_path / 'report' / 'index.html'} (1 of 2 stages started)"
    out = tmp_path / "report"
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json", "sm", "stages.png"]
    table = json.loads((out / "report.json").read_text())
    sm, lg = table["plan"]["stages"]
    assert (sm["stage"], sm["finished"], sm["budget"], sm["best_value"], sm["best_trial"]) == (
        "sm", 12, 12, best.value, best.number)
    assert (lg["stage"], lg["state"], lg["finished"], lg["budget"]) == ("lg", "not started", 0, 4)
    assert table["stages"] == {"sm": "sm/report.json"}
    stage = json.loads((out / "sm" / "report.json").read_text())
    assert stage["study"] == "p-sm" and len(stage["figures"]["history"]["trials"]) == 12
    page = (out / "index.html").read_text()
    assert '<img src="stages.png"' in page and '<img src="sm/history.png"' in page and "Stage sm" in page
    assert (out / "stages.png").read_bytes().startswith(PNG) and (out / "sm" / "history.png").read_bytes().startswith(PNG)
