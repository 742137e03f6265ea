"""Create (``optim init``) and open studies; every study carries a :class:`StudySpec`."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.study import StudyDirection

from stagetune import __version__
from stagetune.config import Config, active, field_info, flatten, to_dict
from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.budget import budget_lock
from stagetune.optim.metrics import DEFAULT_METRIC, METRICS
from stagetune.optim.rdb import StagetuneStorage
from stagetune.optim.registry import PRUNERS
from stagetune.optim.sampling import distribution_args, select_tunable
from stagetune.optim.spec import (
    SAFE_TO_REPLACE,
    SPEC_ATTR,
    StudySpec,
    glance_attrs,
    spec_differences,
    store_spec_json,
    stored_spec_json,
)
from stagetune.optim.storage import mask_url

__all__ = [
    "InitResult",
    "read_spec",
    "check_release",
    "load_study",
    "build_spec",
    "base_params",
    "init_study",
]

_RELEASE = re.compile(r"^stagetune (\d+)\.(\d+)(?:\.\S*)?$")


@dataclass
class InitResult:
    """What ``optim init`` did."""

    study_name: str
    action: str  # "created", "unchanged", "updated"
    spec: StudySpec
    changes: list[tuple[str, object, object]]


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)


def read_spec(storage: optuna.storages.BaseStorage, study_name: str, url: str) -> StudySpec:
    """The spec of an existing study; a clear error if there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        names = [s.study_name for s in storage.get_all_studies()]
        listing = ", ".join(sorted(names)) if names else "none"
        raise StagetuneError(
            f"no study {study_name!r} in {mask_url(url)} (studies there: {listing}); "
            f"create it with `stagetune optim ... init` or pass --study-name"
        ) from None
    return StudySpec.from_json(stored_spec_json(storage, study_id), study_name)


def check_release(spec: StudySpec, study_name: str) -> None:
    """Refuse a study made by a stagetune of another major or minor version.

    Such a release may sample, train or checkpoint differently: its trials and this
    one's would not be comparable, and a retry could resume another's checkpoint.
    Patch levels mix freely.

    Raises:
        StagetuneError: ``spec.created_by`` names another major.minor (or no release).
    """
    ours = _RELEASE.match(f"stagetune {__version__}")
    theirs = _RELEASE.match(spec.created_by)
    if ours is not None and theirs is not None and theirs.groups() == ours.groups():
        return
    which = f"stagetune {theirs[1]}.{theirs[2]}.x" if theirs is not None else "the stagetune that created it"
    raise StagetuneError(
        f"study {study_name!r} was created by {spec.created_by}, this is stagetune {__version__}: "
        f"releases of another major or minor version do not share a study (their trials and "
        f"checkpoints differ); use {which} for it, or start a new --study-name"
    )


def load_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    url: str,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    same_release: bool = True,
) -> tuple[optuna.Study, StudySpec]:
    """The study with its spec's pruner (and the given sampler).

    Args:
        same_release: Refuse a study of another stagetune major.minor version (see
            :func:`check_release`); False for commands that only read it.
    """
    _quiet_optuna()
    spec = read_spec(storage, study_name, url)
    if same_release:
        check_release(spec, study_name)
    pruner = PRUNERS[spec.pruner](spec.config().training.num_epochs)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    return study, spec


def build_spec(
    config: Config,
    train_dir: str | Path,
    *,
    dev_dir: str | Path | None = None,
    dev_proportion: float | None = None,
    whitelist: Sequence[str] = (),
    blacklist: Sequence[str] = (),
    mem_limit_bytes: int | None = None,
    num_trials: int | None = None,
    pruner: str = "hyperband",
    device: str | None = None,
    num_data_workers: int = 0,
    parent_study: str | None = None,
    metric: str = DEFAULT_METRIC,
    adapt_from: str | Path | None = None,
) -> StudySpec:
    """Validate the data and the search space; nothing is written.

    ``adapt_from``: a base model every trial adapts (``optim init --adapt-from``),
    checked against the data and ``config`` as training checks it; the spec
    records its absolute path and hash, and ``training.adapt_rho`` becomes tunable.
    """
    if num_trials is not None and num_trials < 1:
        raise UsageError(f"--num-trials must be >= 1, got {num_trials}")
    if mem_limit_bytes is not None and mem_limit_bytes < 1:
        raise UsageError(f"--mem-limit-bytes must be >= 1, got {mem_limit_bytes}")
    if pruner not in PRUNERS:
        raise UsageError(f"--pruner {pruner!r}: choose one of {', '.join(sorted(PRUNERS))}")
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r}: choose one of {', '.join(sorted(METRICS))}")
    if num_data_workers < 0:
        raise UsageError(f"--num-data-workers must be >= 0, got {num_data_workers}")
    selection = select_tunable(config, whitelist, blacklist, adapting=adapt_from is not None)
    # Imports torch: only once the arguments are known to be good, so usage errors are instant.
    from stagetune.corpus import load_corpus

    corpus = load_corpus(train_dir, dev_dir, dev_proportion=dev_proportion, task=config.model.task)
    base = None
    if adapt_from is not None:
        from stagetune.adaptation import base_identity, check_base

        check_base(adapt_from, config, corpus.feat_dim, corpus.token_symbols, corpus.train)
        base = base_identity(adapt_from)
    targets = [len(corpus.train.targets(u)) for u in corpus.train_ids]
    return StudySpec(
        base_config=to_dict(config),
        tuned=list(selection.tuned),
        dropped=[list(d) for d in selection.dropped],
        train_dir=str(Path(train_dir).resolve()),
        dev_dir=str(Path(dev_dir).resolve()) if dev_dir is not None else None,
        dev_proportion=None if dev_dir is not None else (0.1 if dev_proportion is None else dev_proportion),
        feat_dim=corpus.feat_dim,
        tokens=corpus.token_symbols,
        longest_utterance=corpus.longest_utterance(),
        longest_transcript=max(targets) if targets else 1,
        num_train_utterances=len(corpus.train_ids),
        num_dev_utterances=len(corpus.dev_ids),
        mem_limit_bytes=mem_limit_bytes,
        num_trials=num_trials,
        pruner=pruner,
        device=device,
        num_data_workers=num_data_workers,
        parent_study=parent_study,
        metric=metric,
        adapt_from=base,
    )


def base_params(spec: StudySpec, moved: list[str] | None = None) -> dict[str, object]:
    """The base config's values of the tuned parameters that are active in it.

    A numeric value outside the parameter's search space (its range as the study
    narrows it; a log range excludes 0, the default of ``training.weight_decay``)
    is moved to the nearest value inside, since optuna refuses a queued value its
    distribution does not hold (the trial would fail before training); each move
    is described in ``moved``.
    """
    values = flatten(spec.config())
    params: dict[str, object] = {}
    for name in spec.tuned:
        info = field_info(name)
        if not active(info, values):
            continue
        kind, bounds = distribution_args(info, values, spec.ranges)
        value = values[name]
        if kind != "categorical" and not bounds["low"] <= value <= bounds["high"]:
            inside = min(max(value, bounds["low"]), bounds["high"])
            if moved is not None:
                scale = " log" if bounds["log"] else ""
                moved.append(f"{name} {value:g} -> {inside:g} (outside [{bounds['low']:g}, {bounds['high']:g}]{scale})")
            values[name] = value = inside
        params[name] = value
    return params


def init_study(
    storage: StagetuneStorage,
    study_name: str,
    url: str,
    spec: StudySpec,
    *,
    force: bool = False,
    enqueue_base: bool = False,
    enqueue: Sequence[dict[str, object]] = (),
    log: Callable[[str], None] = print,
) -> InitResult:
    """Create the study, or check an existing one against ``spec``.

    The same spec again is a no-op; a different one is an error listing the
    differences, unless ``force`` and every difference is safe to replace.
    ``enqueue_base`` makes a new study's first trial the base config itself (for
    a chained stage: the previous stage's best), so a stage never ends worse
    than the point it started from; the trials ``enqueue`` gives (tuned values,
    as :func:`base_params` gives them) follow it, each once.

    Safe to run from many processes at once: they take the study's lock (the
    one workers claim trials under) in turn, so exactly one creates the study
    and the others answer as a rerun would; the study and its spec are written
    in one transaction, and a queued base trial is there before any claim.
    """
    _quiet_optuna()
    for name, why in spec.dropped:
        log(f"not tuning {name}: {why}")
    with budget_lock(storage, study_name):
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            try:
                # The short attributes first: optuna-dashboard lists five a page.
                storage.create_study_with_attrs(
                    study_name, StudyDirection.MINIMIZE, glance_attrs(spec), {SPEC_ATTR: spec.to_json()}
                )
            except optuna.exceptions.DuplicatedStudyError:  # created meanwhile, not by `optim init`
                study_id = storage.get_study_id_from_name(study_name)
            else:
                queue: list[dict[str, object]] = []
                moved: list[str] = []
                for params in ([base_params(spec, moved)] if enqueue_base else []) + list(enqueue):
                    if params not in queue:
                        queue.append(params)
                if queue:
                    study = optuna.load_study(study_name=study_name, storage=storage)
                    try:
                        for params in queue:
                            study.enqueue_trial(params)
                    except BaseException:
                        optuna.delete_study(study_name=study_name, storage=storage)
                        raise
                    if moved:
                        log(f"queued the base config with {'; '.join(moved)}: a queued value must lie in its space")
                return InitResult(study_name, "created", spec, [])
        return _check_existing(storage, study_id, study_name, spec, force=force)


def _check_existing(
    storage: StagetuneStorage, study_id: int, study_name: str, spec: StudySpec, *, force: bool
) -> InitResult:
    """``optim init`` of a study that exists: nothing to do, refused, or (``force``) updated."""
    old = StudySpec.from_json(stored_spec_json(storage, study_id), study_name)
    check_release(old, study_name)
    changes = spec_differences(old, spec)
    if not changes:
        return InitResult(study_name, "unchanged", old, [])
    unsafe = [c for c in changes if c[0] not in SAFE_TO_REPLACE]
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
    if not force or unsafe:
        hint = (
            f"these invalidate its trials: {', '.join(c[0] for c in unsafe)}; use a new --study-name"
            if unsafe
            else "add --force to replace them"
        )
        raise UsageError(f"study {study_name!r} exists with other settings ({listing}); {hint}")
    # The same study: its trials' checkpoints stay its own, and it stays bound to its release.
    spec = dataclasses.replace(spec, study_uid=old.study_uid, created_by=old.created_by)
    store_spec_json(storage, study_id, spec.to_json())
    for key, value in glance_attrs(spec).items():  # budget, memory limit, pruner may have changed
        storage.set_study_user_attr(study_id, key, value)
    return InitResult(study_name, "updated", spec, changes)
