"""The study spec: everything a worker needs, stored in the study as one versioned record."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from stagetune import __version__
from stagetune.config import Config, from_dict
from stagetune.errors import StagetuneError
from stagetune.optim.metrics import LEGACY_METRIC, METRICS

__all__ = ["SPEC_VERSION", "SPEC_ATTR", "stored_spec_json", "store_spec_json", "DEFAULT_SAMPLER", "StudySpec", "spec_differences", "SAFE_TO_REPLACE",
           "glance_attrs"]

SPEC_VERSION = 1
#: Study user attribute holding the spec (visible in optuna-dashboard).
SPEC_ATTR = "stagetune_spec"


def stored_spec_json(storage: Any, study_id: int) -> Any:
    """A study's stored spec (JSON), or None.

    It is a study *system* attribute, where workers read it and where neither
    ``optuna studies`` nor optuna-dashboard print it (they show the short
    attributes of :func:`glance_attrs`); studies created before 2026-11-27 hold it
    as a user attribute.
    """
    stored = storage.get_study_system_attrs(study_id).get(SPEC_ATTR)
    return stored if stored is not None else storage.get_study_user_attrs(study_id).get(SPEC_ATTR)


def store_spec_json(storage: Any, study_id: int, spec_json: Any) -> None:
    """Write a study's spec where :func:`stored_spec_json` reads it (an older study's copy too)."""
    storage.set_study_system_attr(study_id, SPEC_ATTR, spec_json)
    if SPEC_ATTR in storage.get_study_user_attrs(study_id):
        storage.set_study_user_attr(study_id, SPEC_ATTR, spec_json)
#: Fields ``optim init --force`` may change on an existing study: they do not
#: invalidate trials already run.
SAFE_TO_REPLACE = frozenset({"num_trials", "mem_limit_bytes", "pruner", "num_data_workers", "device", "sampler", "time_limit_s"})
#: The sampler of a study whose spec names none (one stored before specs named it).
DEFAULT_SAMPLER = "tpe"


@dataclass
class StudySpec:
    """What ``optim init`` decided and every ``optim run`` worker reads."""

    base_config: dict[str, dict[str, Any]]
    tuned: list[str]
    dropped: list[list[str]]
    train_dir: str
    dev_dir: str | None
    dev_proportion: float | None
    feat_dim: int
    tokens: list[str]
    longest_utterance: int
    longest_transcript: int
    num_train_utterances: int
    num_dev_utterances: int
    mem_limit_bytes: int | None = None
    #: Prune a trial whose projected training time exceeds this (``optim init
    #: --time-limit``; see :mod:`stagetune.optim.duration`); None for no limit.
    time_limit_s: float | None = None
    num_trials: int | None = None
    pruner: str = "hyperband"
    device: str | None = None
    num_data_workers: int = 0
    parent_study: str | None = None
    #: Key of :data:`~stagetune.optim.metrics.METRICS`: what a trial's value is.
    #: A spec stored before metrics existed has none and reads as the dev error.
    metric: str = LEGACY_METRIC
    #: Key of :data:`~stagetune.optim.registry.SAMPLERS` that ``optim run`` uses unless
    #: given ``--sampler``; None (a spec stored before it existed) means the default.
    sampler: str | None = None
    #: Narrowed search ranges ``{dotted name: [low, high]}`` (``optim init --narrow``):
    #: they replace the declared bounds; dependent bounds still apply when sampling.
    ranges: dict[str, list[int | float]] = field(default_factory=dict)
    #: Where :attr:`ranges` came from: ``{"study", "quantile", "trials"}`` (the parent's
    #: trial numbers whose bounding box they are); None when nothing was narrowed.
    narrowed_from: dict[str, Any] | None = None
    #: The base model every trial adapts (``optim init --adapt-from``): ``{"path", "hash"}``,
    #: its absolute path and :func:`stagetune.adaptation.file_hash`, as checkpoints record it
    #: (:data:`stagetune.adaptation.ADAPT_KEY`); a worker refuses a file of another hash.
    #: None: the trials train from scratch.
    adapt_from: dict[str, str] | None = None
    version: int = SPEC_VERSION
    created_by: str = field(default_factory=lambda: f"stagetune {__version__}")
    #: Random id of this study, drawn when its spec is built: trial checkpoints carry
    #: it, so a study deleted and created again under its name never reuses the old
    #: one's.  None in a spec stored before it existed.
    study_uid: str | None = field(default_factory=lambda: uuid.uuid4().hex)

    def sampler_name(self) -> str:
        """The sampler ``optim run`` uses by default."""
        return self.sampler or DEFAULT_SAMPLER

    def config(self) -> Config:
        """The base configuration."""
        return from_dict(self.base_config, "study spec", stored=True)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, study_name: str) -> StudySpec:
        """Parse a stored spec; old or foreign records give a clear error."""
        if not isinstance(data, dict) or "version" not in data:
            raise StagetuneError(
                f"study {study_name!r} has no stagetune spec; create it with `stagetune optim ... init`"
            )
        if data["version"] != SPEC_VERSION:
            raise StagetuneError(
                f"study {study_name!r} was created by {data.get('created_by', 'another version')} "
                f"with spec version {data['version']}; this stagetune reads version {SPEC_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{"study_uid": None, **{k: v for k, v in data.items() if k in names}})
        if spec.metric not in METRICS:
            raise StagetuneError(
                f"study {study_name!r} ranks trials by metric {spec.metric!r}, which this stagetune "
                f"does not know (it knows {', '.join(sorted(METRICS))}); use the stagetune that created it"
            )
        return spec

    def dumps(self) -> str:
        """Canonical JSON text (sorted keys)."""
        return json.dumps(self.to_json(), sort_keys=True)


#: Longest value of a :func:`glance_attrs` attribute (optuna-dashboard shows 128 characters).
_GLANCE_CHARS = 120


def glance_attrs(spec: StudySpec) -> dict[str, Any]:
    """Short study user attributes beside the full spec, for optuna-dashboard and ``optuna studies``.

    What a user needs at a glance: the data, the tuned parameters, the budget, the
    memory limit, the pruner, the metric, the parent study and the base model adapted
    (only where there is one).  Workers read only
    :data:`SPEC_ATTR`; these are rewritten whenever it is.
    """

    def short(text: str) -> str:
        return text if len(text) <= _GLANCE_CHARS else text[: _GLANCE_CHARS - 3] + "..."

    data = spec.train_dir + (f" (dev {spec.dev_dir})" if spec.dev_dir else f" (dev {spec.dev_proportion:g} of it)"
                             if spec.dev_proportion else "")
    return {
        "data": short(data),
        "tuned": short(f"{len(spec.tuned)}: " + ", ".join(spec.tuned)),
        "budget": spec.num_trials if spec.num_trials is not None else "unlimited",
        "metric": spec.metric,
        "pruner": spec.pruner,
        "mem_limit_bytes": spec.mem_limit_bytes if spec.mem_limit_bytes is not None else "none",
        "parent_study": spec.parent_study or "none",
        **({"adapt_from": short(spec.adapt_from["path"])} if spec.adapt_from else {}),
    }


#: Not settings: the stagetune that wrote a spec, and the study's identity.
_IGNORED = {"created_by", "study_uid"}


def spec_differences(old: StudySpec, new: StudySpec) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for every field that differs (base config per dotted name)."""
    diffs: list[tuple[str, Any, Any]] = []
    a, b = old.to_json(), new.to_json()
    # No sampler named and the default named are the same setting.
    a["sampler"], b["sampler"] = old.sampler_name(), new.sampler_name()
    for key in a:
        if key in _IGNORED or a[key] == b[key]:
            continue
        if key == "base_config":
            for section in sorted(set(a[key]) | set(b[key])):
                sa, sb = a[key].get(section, {}), b[key].get(section, {})
                for k in sorted(set(sa) | set(sb)):
                    if sa.get(k) != sb.get(k):
                        diffs.append((f"{section}.{k}", sa.get(k), sb.get(k)))
        else:
            diffs.append((key, a[key], b[key]))
    return diffs
