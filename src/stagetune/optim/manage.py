"""``optim list`` and ``optim delete``: the studies of a database, and removing one.

A study's trial checkpoints live in ``CKPT_DIR/STUDY/trial-N`` (``optim run
--ckpt-dir``); deleting the study removes that directory too, so a study
created again under the name trains afresh.  (Should a directory survive, its
checkpoints carry the old study's uid and are moved aside, never resumed.)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import optuna
from sqlalchemy import text

from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.budget import budget_lock, count_by_state, heartbeat_ages
from stagetune.optim.optuna_internals import STUDIES, TRIAL_VALUES, TRIALS, DbState
from stagetune.optim.spec import StudySpec, stored_spec_json

__all__ = ["list_studies", "format_list", "delete_study"]


def _best(storage: optuna.storages.RDBStorage, study_id: int) -> tuple[int, float] | None:
    query = text(
        f"SELECT t.number, v.value FROM {TRIALS} t JOIN {TRIAL_VALUES} v ON v.trial_id = t.trial_id "
        f"WHERE t.study_id = :sid AND t.state = '{DbState.COMPLETE}' AND v.objective = 0 ORDER BY v.value, t.number"
    )
    with storage.engine.connect() as conn:
        row = conn.execute(query, {"sid": study_id}).first()
    return None if row is None else (int(row[0]), float(row[1]))


def list_studies(storage: optuna.storages.RDBStorage) -> list[dict[str, Any]]:
    """One row per study (by name): progress against the budget, best, state, metric, parent."""
    rows = []
    with storage.engine.connect() as conn:
        studies = conn.execute(text(f"SELECT study_id, study_name FROM {STUDIES} ORDER BY study_name")).all()
    for study_id, name in studies:
        counts = count_by_state(storage, study_id)
        finished = counts.get(DbState.COMPLETE, 0) + counts.get(DbState.PRUNED, 0)
        spec: StudySpec | None
        try:
            spec = StudySpec.from_json(stored_spec_json(storage, study_id), name)
        except StagetuneError:  # not a stagetune study, or another version's
            spec = None
        budget = spec.num_trials if spec is not None else None
        if budget is not None and finished >= budget:
            state = "done"
        elif counts.get(DbState.RUNNING, 0):
            state = "running"
        else:
            state = "waiting" if finished or counts.get(DbState.WAITING, 0) else "empty"
        best = _best(storage, study_id)
        rows.append({
            "study": name, "finished": finished, "num_trials": budget, "running": counts.get(DbState.RUNNING, 0),
            "state": state, "best_value": None if best is None else best[1],
            "best_trial": None if best is None else best[0],
            "metric": spec.metric if spec is not None else None,
            "parent_study": spec.parent_study if spec is not None else None,
            "stagetune": spec is not None,
        })
    return rows


def format_list(rows: list[dict[str, Any]]) -> str:
    """An aligned table."""
    table = [("study", "from", "state", "trials", "best", "metric")]
    for r in rows:
        best = "-" if r["best_value"] is None else f"{r['best_value']:.6g} (trial {r['best_trial']})"
        budget = r["num_trials"] if r["num_trials"] is not None else "-"
        table.append((r["study"], r["parent_study"] or "-", r["state"], f"{r['finished']}/{budget}", best,
                      r["metric"] or ("-" if r["stagetune"] else "(not stagetune)")))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in table)


def delete_study(
    storage: optuna.storages.RDBStorage,
    study_name: str,
    ckpt_dir: Path,
    *,
    force: bool = False,
    grace_period: float | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Delete the study and ``ckpt_dir/STUDY``; the number of trials deleted.

    Refused (unless ``force``) while a worker holds a running trial: one whose
    heartbeat is younger than ``grace_period`` seconds (None: the study's heartbeat
    rule's, else 60), or that has none yet.

    Raises:
        StagetuneError: No such study.
        UsageError: Running trials, without ``force``.
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise StagetuneError(
            f"no study {study_name!r} to delete (studies there: {', '.join(names) or 'none'})"
        ) from None
    if grace_period is None:
        from stagetune.optim.claim import HEARTBEAT_ATTR, HeartbeatRule

        rule = HeartbeatRule.from_json(storage.get_study_system_attrs(study_id).get(HEARTBEAT_ATTR))
        grace_period = rule.grace_period if rule is not None else 60.0
    with budget_lock(storage, study_name):  # no worker claims a trial meanwhile
        counts = count_by_state(storage, study_id)
        running = counts.get(DbState.RUNNING, 0)
        if running and not force:
            ages = heartbeat_ages(storage, study_id)
            held = running - sum(1 for age in ages.values() if age > grace_period)
            if held:
                fresh = ", ".join(f"trial {n} {age:.0f} s ago" for n, age in sorted(ages.items()) if age <= grace_period)
                raise UsageError(
                    f"study {study_name!r} has {held} running trial{'s' if held != 1 else ''} held by workers"
                    + (f" (heartbeats: {fresh})" if fresh else "")
                    + "; stop its workers first, or add --force"
                )
        optuna.delete_study(study_name=study_name, storage=storage)
    trials_dir = ckpt_dir / study_name
    if trials_dir.is_dir():
        shutil.rmtree(trials_dir)
        log(f"removed {trials_dir}")
    return sum(counts.values())


def best_model_path(study: optuna.Study, study_name: str, spec: StudySpec, ckpt_dir: Path) -> tuple[int, Path]:
    """The best trial's number and its kept ``model.pt`` (``optim run`` keeps the best trial's dir).

    Raises:
        StagetuneError: No completed trial, the model is not there, or it is another study's.
    """
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise StagetuneError(f"study {study_name!r} has no completed trial yet; run `stagetune optim ... run` first")
    best = min(complete, key=lambda t: (t.value, t.number))
    trained = next((t for t in complete if t.number == best.user_attrs.get("reused_from")), best)
    original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trained)
    path = ckpt_dir / study_name / f"trial-{trained.number if original is None else original}" / "model.pt"
    if not path.is_file():
        adapt = f" --adapt-from {spec.adapt_from['path']}" if spec.adapt_from else ""
        raise StagetuneError(
            f"the model of the best trial {best.number} of study {study_name!r} is not kept: no {path} "
            f"(give the --ckpt-dir its workers ran with; trials run before models were kept, or whose dir was "
            f"removed, must be retrained: optim best best.ini, then stagetune --read-ini best.ini train{adapt})"
        )
    from stagetune.checkpoint import OWNER_KEY, load_model_file

    owner = load_model_file(path).extra.get(OWNER_KEY)
    if spec.study_uid is not None and owner is not None and owner != spec.study_uid:
        raise StagetuneError(
            f"{path} was trained for another study named {study_name!r} (uid {owner}, this one's is "
            f"{spec.study_uid}); delete the old dir (optim delete) and retrain"
        )
    return best.number, path
