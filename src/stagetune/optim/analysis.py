"""Reading results out of a study: importance ranking, best config, status."""

from __future__ import annotations

import datetime
import math
import random
import statistics
import warnings
from typing import Any, Sequence

import optuna
from optuna.distributions import json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from stagetune.config import Config, active, field_info, flatten, with_values
from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.metrics import DEV_ERROR_ATTR, DEV_LOSS_ATTR, VALUE_EPOCH_ATTR
from stagetune.optim.optuna_internals import TRIAL_PARAMS, TRIAL_VALUES, TRIALS, DbState, StudyView, study_id_of
from stagetune.optim.registry import EVALUATORS, make_evaluator
from stagetune.optim.sampling import bounding_range
from stagetune.optim.spec import StudySpec
from stagetune.space import Ref

__all__ = [
    "IMPORTANCE_MAX_TRIALS",
    "completed_in_memory",
    "rank_parameters",
    "select_important",
    "best_trial_values",
    "describe_best",
    "independent_values",
    "repair_dependent_bounds",
    "best_config",
    "best_points",
    "narrow_ranges",
]

#: Above this many distinct values a numeric parameter is grouped into bins.
_MAX_GROUPS = 10
_NUM_BINS = 5


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        raise StagetuneError(
            f"study {study.study_name!r} has no completed trial yet; run `stagetune optim ... run` first"
        )
    return trials


#: ``optim important`` ranks at most this many completed trials (a seeded random sample of them).
IMPORTANCE_MAX_TRIALS = 1000

#: Trial ids per ``IN (...)`` list.  The ids are literal integers, not bind parameters, so
#: SQLite's 999-parameter limit does not apply; 5000 of them are about 35 KB of SQL (limits:
#: SQLite 1 MB, MySQL's max_allowed_packet 4 MB and up).  Each list is one scan of the
#: parameter table on PostgreSQL (0.1 s at 10,000 trials), so the default sample of 1000 is
#: read in one.
_IDS_PER_QUERY = 5000


def completed_in_memory(
    storage: optuna.storages.RDBStorage, study: optuna.Study, *, max_trials: int | None = None, seed: int = 0
) -> StudyView:
    """An in-memory copy of the study's COMPLETE trials (params and values only).

    Plain queries instead of optuna's full trial loading: ranking a 1000-trial
    study needs its parameters and values, not every attribute.  With
    ``max_trials``, a study with more COMPLETE trials gives a random sample of
    that many (the same for the same ``seed``), and only theirs are read; the
    view's ``total`` is the number of COMPLETE trials either way.
    """
    sid = int(study_id_of(study))
    complete = DbState.COMPLETE
    with storage.engine.connect() as conn:
        cursor = conn.connection.cursor()  # the driver's own rows: a Row per parameter costs more than the read
        try:
            numbers = dict(_fetch(
                cursor, f"SELECT trial_id, number FROM {TRIALS} WHERE study_id = {sid} AND state = '{complete}'"
            ))
            total = len(numbers)
            values: dict[int, float] = {}
            rows: list[Any] = []
            if max_trials is not None and total > max_trials:
                chosen = random.Random(seed).sample(sorted(numbers, key=numbers.get), max_trials)
                numbers = {tid: numbers[tid] for tid in chosen}
                ids = sorted(numbers)
                for start in range(0, len(ids), _IDS_PER_QUERY):
                    listed = ", ".join(str(int(i)) for i in ids[start : start + _IDS_PER_QUERY])  # ids: integers
                    values.update(_fetch(cursor, f"SELECT trial_id, value FROM {TRIAL_VALUES} "
                                                 f"WHERE objective = 0 AND trial_id IN ({listed})"))
                    rows += _fetch(cursor, f"SELECT trial_id, param_name, param_value, distribution_json "
                                           f"FROM {TRIAL_PARAMS} WHERE trial_id IN ({listed})")
            else:
                of_study = (f"JOIN {TRIALS} t ON t.trial_id = x.trial_id "
                            f"WHERE t.study_id = {sid} AND t.state = '{complete}'")
                values = dict(_fetch(cursor, f"SELECT x.trial_id, x.value FROM {TRIAL_VALUES} x {of_study} "
                                             "AND x.objective = 0"))
                rows = _fetch(cursor, f"SELECT x.trial_id, x.param_name, x.param_value, x.distribution_json "
                                      f"FROM {TRIAL_PARAMS} x {of_study}")
        finally:
            cursor.close()
    params: dict[int, dict[str, Any]] = {tid: {} for tid in numbers}
    dists: dict[int, dict[str, Any]] = {tid: {} for tid in numbers}
    parsed: dict[str, Any] = {}
    for tid, name, internal, dist_json in rows:
        dist = parsed.get(dist_json) or parsed.setdefault(dist_json, json_to_distribution(dist_json))
        params[tid][name] = dist.to_external_repr(internal)
        dists[tid][name] = dist
    now = datetime.datetime.now()
    trials = [
        FrozenTrial(
            number=numbers[tid], state=TrialState.COMPLETE, value=values[tid], values=None,
            datetime_start=now, datetime_complete=now, params=params[tid],
            distributions=dists[tid], user_attrs={}, system_attrs={}, intermediate_values={},
            trial_id=tid,
        )
        for tid in sorted(numbers, key=numbers.get)
        if tid in values
    ]
    return StudyView(study.study_name, trials, total=total)


def _fetch(cursor: Any, sql: str) -> list[tuple[Any, ...]]:
    """All rows of ``sql`` (no bind parameters: every value in it is an integer or a state name)."""
    cursor.execute(sql)
    return cursor.fetchall()


def rank_parameters(
    study: optuna.Study, *, evaluator: str = "ped-anova", seed: int = 0
) -> list[tuple[str, float]]:
    """Parameters by importance, most important first (ties by name).

    Only parameters present in every completed trial can be ranked; with a
    fixed seed the same study always gives the same ranking.  Trials that all
    have the same value rank nothing: that is an error for every evaluator (and
    so for ``optim init --from-study``, which ranks through here).
    """
    if evaluator not in EVALUATORS:
        raise UsageError(f"--evaluator {evaluator!r}: choose one of {', '.join(sorted(EVALUATORS))}")
    trials = _completed(study)
    common = set(trials[0].params)
    for t in trials[1:]:
        common &= set(t.params)
    varying = sorted(p for p in common if _varies([t.params[p] for t in trials]))
    if not varying:
        raise StagetuneError(
            f"study {study.study_name!r}: no parameter varies across its {len(trials)} completed trials"
        )
    if len(trials) < 2:
        raise StagetuneError(f"study {study.study_name!r}: ranking needs at least 2 completed trials")
    _require_spread(study.study_name, trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(
            study, evaluator=make_evaluator(evaluator, seed), params=varying
        )
    return sorted(importances.items(), key=lambda kv: (-round(kv[1], 12), kv[0]))


def _varies(values: list[Any]) -> bool:
    """Whether a parameter takes more than one value (1 and True apart, as repr tells them)."""
    first = values[0]
    kind = type(first)
    return any(v != first or type(v) is not kind for v in values)


def _require_spread(study_name: str, trials: Sequence[FrozenTrial]) -> None:
    """Refuse values without variance: every evaluator would rank noise (or raise)."""
    values = {float(t.value) for t in trials}
    if len(values) == 1:
        raise StagetuneError(
            f"all {len(trials)} complete trials of study {study_name!r} have the same value "
            f"{values.pop():g}: importance is undefined; run more trials or widen the search"
        )


def select_important(
    ranking: Sequence[tuple[str, float]], *, top_k: int | None = None, threshold: float | None = None
) -> list[str]:
    """The top ``top_k`` names, or those with importance >= ``threshold`` (or all)."""
    if top_k is not None and threshold is not None:
        raise UsageError("give --top-k or --threshold, not both")
    if top_k is not None:
        if top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {top_k}")
        return [n for n, _ in ranking[:top_k]]
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
        chosen = [n for n, v in ranking if v >= threshold]
        if not chosen:
            raise StagetuneError(
                f"no parameter has importance >= {threshold}; the highest is {ranking[0][1]:.3f}"
            )
        return chosen
    return [n for n, _ in ranking]


def best_trial_values(study: optuna.Study) -> tuple[FrozenTrial, dict[str, Any]]:
    """The best completed trial and its sampled values."""
    try:
        best = study.best_trial  # one query for the best value, then that trial (not every trial)
    except ValueError:
        _completed(study)  # none completed: its message
        raise
    return best, dict(best.params)


def describe_best(trial: FrozenTrial, spec: StudySpec) -> str:
    """One line: the best trial, its value, the study's metric and, when known, its dev figures."""
    line = f"best trial {trial.number}: value {trial.value:.6g} (metric {spec.metric}"
    attrs = trial.user_attrs
    if all(k in attrs for k in (VALUE_EPOCH_ATTR, DEV_ERROR_ATTR, DEV_LOSS_ATTR)):
        line += (
            f"; epoch {attrs[VALUE_EPOCH_ATTR]}: dev error {attrs[DEV_ERROR_ATTR]:.2%}, "
            f"dev loss {attrs[DEV_LOSS_ATTR]:.4f}"
        )
    return line + ")"


def _groups(values: list[Any], errors: list[float]) -> list[tuple[Any, list[float], float]]:
    """``(representative value, errors, best error)`` per group of equal or binned values."""
    distinct = sorted({repr(v): v for v in values}.values(), key=lambda v: (str(type(v)), v))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct)
    if len(distinct) <= _MAX_GROUPS or not numeric:
        groups = []
        for d in distinct:
            errs = [e for v, e in zip(values, errors) if repr(v) == repr(d)]
            groups.append((d, errs, min(errs)))
        return groups
    order = sorted(range(len(values)), key=lambda i: values[i])
    size = -(-len(order) // _NUM_BINS)
    groups = []
    for start in range(0, len(order), size):
        members = order[start : start + size]
        errs = [errors[i] for i in members]
        best = min(members, key=lambda i: errors[i])
        groups.append((values[best], errs, errors[best]))
    return groups


def independent_values(study: optuna.Study, names: Sequence[str]) -> dict[str, Any]:
    """Per parameter, the value with the lowest median trial value (the study's metric).

    cnn-mellin's semantics: each parameter is chosen independently of the
    others.  Numeric parameters with many distinct values are grouped into
    quantile bins; the best bin contributes its best trial's value.
    """
    trials = _completed(study)
    chosen: dict[str, Any] = {}
    for name in names:
        having = [t for t in trials if name in t.params]
        if not having:
            continue
        groups = _groups([t.params[name] for t in having], [float(t.value) for t in having])
        value, _, _ = min(groups, key=lambda g: (statistics.median(g[1]), g[2]))
        chosen[name] = value
    return chosen


def repair_dependent_bounds(values: dict[str, Any]) -> dict[str, str]:
    """Clamp values that break a declared dependent bound; returns what changed and why."""
    repairs: dict[str, str] = {}
    for name in list(values):
        info = field_info(name)
        for bound, clamp in ((info.spec.min, max), (info.spec.max, min)):
            if isinstance(bound, Ref) and bound.name in values:
                limit = bound.resolve(values)
                fixed = clamp(values[name], limit)
                if fixed != values[name]:
                    repairs[name] = f"{values[name]!r} -> {fixed!r} ({bound} = {limit})"
                    values[name] = fixed
    return repairs


def best_config(
    study: optuna.Study,
    spec: StudySpec,
    *,
    independent: bool = False,
    overrides: Sequence[str] = (),
) -> tuple[Config, dict[str, str]]:
    """The base config with the best values (and ``--set`` edits); also the repairs made."""
    from stagetune.config import apply_overrides

    base = spec.config()
    if independent:
        sampled = independent_values(study, spec.tuned)
    else:
        sampled = best_trial_values(study)[1]
    values = flatten(base)
    values.update(sampled)
    repairs = repair_dependent_bounds(values)
    config = with_values(base, {k: values[k] for k in sampled})
    return apply_overrides(config, overrides), repairs


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best (lowest value) first; ties by trial number."""
    return sorted(_completed(study), key=lambda t: (float(t.value), t.number))


def best_points(study: optuna.Study, spec: StudySpec, count: int) -> list[dict[str, Any]]:
    """The ``count`` best completed trials as trials of a study with ``spec`` (best first).

    Each is ``spec``'s base config with the trial's values of ``spec.tuned``
    (dependent bounds repaired), given as the tuned values active in it: what
    :func:`~stagetune.optim.study.base_params` gives for the base config.  Trials
    that agree on these values appear once.
    """
    if count < 1:
        raise UsageError(f"--enqueue-best must be >= 1, got {count}")
    base = flatten(spec.config())
    points: list[dict[str, Any]] = []
    for trial in _ranked(study)[:count]:
        values = dict(base)
        values.update({n: trial.params[n] for n in spec.tuned if n in trial.params})
        repair_dependent_bounds(values)
        point = {n: values[n] for n in spec.tuned if active(field_info(n), values)}
        if point not in points:
            points.append(point)
    return points


def narrow_ranges(
    study: optuna.Study, names: Sequence[str], quantile: float, *, at_least: int = 2
) -> tuple[dict[str, list[int | float]], list[int]]:
    """Ranges of ``names`` narrowed to where the study's best trials lie.

    The best ``quantile`` of the completed trials (at least ``at_least``, and at
    least 2: those queued by ``--enqueue-best`` must lie inside) give, per numeric
    parameter, the bounding box of their values (see
    :func:`~stagetune.optim.sampling.bounding_range`).  Categorical parameters,
    and those the best trials never sampled, keep their declared ranges.

    Returns:
        ``{name: [low, high]}``, and the numbers of the trials the box spans.
    """
    if not 0 < quantile <= 1:
        raise UsageError(f"--narrow must be in (0, 1], got {quantile:g}; e.g. 0.25 for the best quarter")
    trials = _ranked(study)
    if len(trials) < 2:
        raise StagetuneError(
            f"study {study.study_name!r} has 1 completed trial; --narrow needs at least 2 "
            f"(run more trials, or drop --narrow)"
        )
    # (A product like 0.1 * 30 may round above 3.0: its ceiling must stay 3.)
    top = trials[: max(2, at_least, math.ceil(quantile * len(trials) - 1e-9))]
    ranges: dict[str, list[int | float]] = {}
    for name in names:
        box = bounding_range(field_info(name), [t.params[name] for t in top if name in t.params])
        if box is not None:
            ranges[name] = box
    return ranges, sorted(t.number for t in top)
