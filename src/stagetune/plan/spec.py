"""A plan file: the data, the database and the stages of a staged search, in INI.

::

    [plan]
    train = data/train          # required
    dev = data/dev              # or dev_proportion = 0.1
    test = data/test            # the final step evaluates here
    url = sqlite:///exp/demo/optim.db
    workers = 2                 # local workers per stage (plan run --workers overrides)
    final = lg                  # train this stage's best config at the end
    final_epochs = 8
    partition = gpu             # plan submit: sbatch options of every job (submit's
    gres = gpu:1                #   --partition, --gres, --time, --sbatch-option override);
    time = 4:00:00              #   gres: only the jobs that train (workers, final)
    sbatch = --qos=normal --account=proj

    [sm]
    config = conf/demo.ini      # base config files, later ones win
    set = training.dropout_prob=0.1
    whitelist = model\\..*  training\\.learning_rate
    trials = 8
    sampler = random
    epochs = 3

    [lg]
    from = sm                   # base config: sm's best; tuned: sm's top_k
    top_k = 3
    narrow = 0.25               # ranges: the top quarter of sm's trials
                                # (around_base = 0.25: any stage's ranges, a quarter around its base)
    trials = 6
    time = 1-00:00:00           # lg's jobs: its own Slurm settings
    sbatch = --mem=16G          #   (sbatch: after [plan]'s)

Every other section is a stage, run in file order.  A stage derived ``from``
another starts from its parent's best config (``config`` files and ``set``
edits apply over it) and tunes the parent's ``top_k`` most important
parameters (or those of importance >= ``threshold``), or what its own
``whitelist``/``blacklist`` select;
it inherits its budget, trial and Slurm settings (``workers``, ``partition``,
``gres``, ``time``, ``sbatch``) unless it sets them; a root stage's Slurm
settings default to the ``[plan]`` section's, whose ``sbatch`` options every job
gets before its stage's.  The final job gets the ``[plan]`` section's.  Paths are
relative to the directory the command runs in, like the CLI's.  Errors name the
file, the section and the key.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from stagetune.config import apply_overrides, load_config
from stagetune.errors import ConfigError, StagetuneError
from stagetune.optim.metrics import DEFAULT_METRIC, METRICS
from stagetune.optim.registry import PRUNERS, SAMPLERS
from stagetune.optim.sampling import select_tunable
from stagetune.plan.slurm_keys import check_gres, check_partition, check_time, split_sbatch

__all__ = ["Plan", "Stage", "read_plan", "PLAN_KEYS", "STAGE_KEYS"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Stage:
    """One stage: an optim study initialised, run to its budget, ranked."""

    name: str
    parent: str | None = None
    config: tuple[str, ...] = ()
    set: tuple[str, ...] = ()
    whitelist: tuple[str, ...] = ()
    blacklist: tuple[str, ...] = ()
    top_k: int | None = None
    threshold: float | None = None
    independent: bool = False
    narrow: float | None = None
    around_base: float | None = None
    enqueue_best: int = 0
    enqueue_base: bool = True
    # Inherited from the parent stage unless given:
    trials: int | None = None
    sampler: str = "tpe"
    pruner: str = "none"
    metric: str = DEFAULT_METRIC
    mem_limit_bytes: int | None = None
    epochs: int | None = None
    time_limit: float | None = None
    seed: int = 0
    # Workers (plan run, plan submit's array) and Slurm settings of the stage's jobs; else [plan]'s.
    workers: int | None = None
    partition: str | None = None
    gres: str | None = None
    time: str | None = None
    sbatch: tuple[str, ...] = ()  # after [plan]'s sbatch options


#: Settings a derived stage takes from its parent unless the plan gives them.
INHERITED = ("trials", "sampler", "pruner", "metric", "mem_limit_bytes", "epochs", "time_limit", "seed",
             "workers", "partition", "gres", "time", "sbatch")


@dataclass(frozen=True)
class Plan:
    """A whole plan file."""

    path: Path
    name: str
    train: str
    dev: str | None
    dev_proportion: float | None
    test: str | None
    url: str
    out_dir: str
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    final: str | None = None
    final_epochs: int | None = None
    workers: int = 1
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    # Slurm defaults of every job (plan submit); a stage's own replace them, but for sbatch,
    # whose options come before the stage's.
    partition: str | None = None
    gres: str | None = None
    time: str | None = None
    sbatch: tuple[str, ...] = ()

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def stage_workers(self, stage: Stage) -> int:
        """Workers of ``stage``: its own (or its parent's), else the plan's."""
        return stage.workers or self.workers

    def study_name(self, stage: str) -> str:
        return f"{self.name}-{stage}"

    @property
    def ckpt_dir(self) -> str:
        return str(Path(self.out_dir) / "ckpt")


#: Slurm settings, in [plan] (every job) and per stage (its jobs): checked by :mod:`.slurm_keys`.
SLURM_KEYS = ("partition", "gres", "time", "sbatch")
PLAN_KEYS = ("name", "train", "dev", "dev_proportion", "test", "url", "out_dir", "final", "final_epochs", "workers",
             "heartbeat_interval", "grace_period", *SLURM_KEYS)
STAGE_KEYS = tuple(f.name for f in fields(Stage) if f.name not in ("name", "parent")) + ("from",)
_DERIVED_ONLY = ("top_k", "threshold", "independent", "narrow", "enqueue_best")


class _Reader:
    """Typed values of one section, errors naming file, section and key."""

    def __init__(self, path: Path, section: str, items: dict[str, str], allowed: tuple[str, ...]) -> None:
        self.where = f"{path} [{section}]"
        self.items = items
        for key in items:
            if key not in allowed:
                raise ConfigError(f"{self.where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where} {key} = {self.items[key]!r}: {message}")

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.items.get(key, "").strip()
        return value or default

    def words(self, key: str) -> tuple[str, ...]:
        return tuple(self.items.get(key, "").split())

    def number(self, key: str, kind: type, low: float, high: float | None = None) -> int | float | None:
        if key not in self.items:
            return None
        try:
            value = kind(self.items[key].strip().replace("_", ""))
        except ValueError:
            raise self.error(key, f"not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.error(key, f"must be {span}")
        return value

    def flag(self, key: str) -> bool | None:
        if key not in self.items:
            return None
        value = self.items[key].strip().lower()
        if value not in ("true", "false", "yes", "no", "1", "0"):
            raise self.error(key, "use true or false")
        return value in ("true", "yes", "1")

    def slurm(self) -> dict[str, object]:
        """The Slurm keys given in this section, checked (see :mod:`.slurm_keys`)."""
        checks = {"partition": check_partition, "gres": check_gres, "time": check_time, "sbatch": split_sbatch}
        given: dict[str, object] = {}
        for key, check in checks.items():
            if key in self.items:
                try:
                    given[key] = check(self.items[key])
                except ValueError as exc:
                    raise self.error(key, str(exc)) from None
        return given

    def choice(self, key: str, choices) -> str | None:
        value = self.text(key)
        if value is not None and value not in choices:
            raise self.error(key, f"choose one of {', '.join(sorted(choices))}")
        return value


def _parse(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=("#", ";"), strict=True, default_section="\0none"
    )
    parser.optionxform = str
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read plan file: {exc}") from None
    try:
        parser.read_string(text.removeprefix("\ufeff"), source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {' '.join(str(exc).split())}") from None
    if "plan" not in parser.sections():
        raise ConfigError(f"{path}: no [plan] section; a plan needs [plan] (data, url) and one section per stage")
    return parser


def _stage(path: Path, name: str, items: dict[str, str]) -> tuple[Stage, set[str]]:
    r = _Reader(path, name, items, STAGE_KEYS)
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{path} [{name}]: a stage name takes letters, digits, '-' and '_'")
    parent = r.text("from")
    for key in _DERIVED_ONLY if parent is None else ():
        if key in items:
            raise ConfigError(f"{path} [{name}] {key}: only for a stage derived with 'from = STAGE'")
    if parent is not None and "whitelist" in items and ("top_k" in items or "threshold" in items):
        raise ConfigError(
            f"{path} [{name}] whitelist: a derived stage tunes either its parent's most important "
            f"parameters (top_k/threshold) or a whitelist, not both"
        )
    given = {
        "trials": r.number("trials", int, 1),
        "sampler": r.choice("sampler", SAMPLERS),
        "pruner": r.choice("pruner", PRUNERS),
        "metric": r.choice("metric", METRICS),
        "mem_limit_bytes": r.number("mem_limit_bytes", int, 1),
        "epochs": r.number("epochs", int, 1),
        "time_limit": r.number("time_limit", float, 1e-3),
        "seed": r.number("seed", int, 0, 2**31 - 1),
        "enqueue_base": r.flag("enqueue_base"),
        "top_k": r.number("top_k", int, 1),
        "threshold": r.number("threshold", float, 0.0, 1.0),
        "independent": r.flag("independent"),
        "narrow": r.number("narrow", float, 1e-6, 1.0),
        "around_base": r.number("around_base", float, 1e-6, 1.0),
        "enqueue_best": r.number("enqueue_best", int, 0),
        "workers": r.number("workers", int, 1),
        **r.slurm(),
    }
    own = "whitelist" in items or "blacklist" in items
    if parent is not None and given["top_k"] is None and given["threshold"] is None and not own:
        raise ConfigError(
            f"{path} [{name}]: a stage derived from {parent!r} needs top_k or threshold (its parent's "
            f"most important parameters) or a whitelist/blacklist (what it tunes)"
        )
    return Stage(
        name=name,
        parent=parent,
        config=r.words("config"),
        set=tuple(line.strip() for line in items.get("set", "").replace(",", "\n").split() if line.strip()),
        whitelist=r.words("whitelist"),
        blacklist=r.words("blacklist"),
        **{k: v for k, v in given.items() if v is not None},
    ), {k for k, v in given.items() if v is not None}


def _resolve(path: Path, stages: list[tuple[Stage, set[str]]]) -> tuple[Stage, ...]:
    """Check ``from`` references and cycles; fill inherited settings in file order."""
    by_name = {s.name: (s, keys) for s, keys in stages}
    for stage, _ in stages:
        seen = [stage.name]
        current = stage
        while current.parent is not None:
            if current.parent not in by_name:
                raise ConfigError(
                    f"{path} [{current.name}] from = {current.parent!r}: no such stage; "
                    f"stages: {', '.join(by_name)}"
                )
            if current.parent in seen:
                raise ConfigError(f"{path} [{stage.name}] from: a cycle ({' -> '.join(seen + [current.parent])})")
            seen.append(current.parent)
            current = by_name[current.parent][0]
    order = [s.name for s, _ in stages]
    done: dict[str, Stage] = {}
    for stage, keys in stages:
        if stage.parent is not None:
            if order.index(stage.parent) > order.index(stage.name):
                raise ConfigError(f"{path} [{stage.name}] from = {stage.parent!r}: that stage comes later; put it first")
            parent = done[stage.parent]
            stage = replace(stage, **{k: getattr(parent, k) for k in INHERITED if k not in keys})
        if stage.trials is None:
            raise ConfigError(f"{path} [{stage.name}]: no 'trials' (the stage's budget of finished trials)")
        done[stage.name] = stage
    return tuple(done[n] for n in order)


def _check_tunable(path: Path, stage: Stage) -> None:
    """A root stage's base config must load and leave something to tune."""
    try:
        config = load_config(stage.config)
        config = apply_overrides(config, list(stage.set))
    except ConfigError as exc:
        raise ConfigError(f"{path} [{stage.name}] config/set: {exc}") from None
    try:
        selection = select_tunable(config, list(stage.whitelist), list(stage.blacklist))
    except StagetuneError as exc:
        raise ConfigError(f"{path} [{stage.name}] whitelist/blacklist: {exc}") from None
    if not selection.tuned:
        raise ConfigError(f"{path} [{stage.name}]: nothing to tune (whitelist/blacklist leave no parameter)")


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (nothing is run or written)."""
    path = Path(path)
    parser = _parse(path)
    r = _Reader(path, "plan", dict(parser.items("plan")), PLAN_KEYS)
    name = r.text("name", path.stem)
    if not _NAME.fullmatch(name):
        raise r.error("name", "letters, digits, '-' and '_' only")
    train = r.text("train")
    if train is None:
        raise ConfigError(f"{path} [plan]: no 'train' (the training data dir)")
    dev, proportion = r.text("dev"), r.number("dev_proportion", float, 1e-6, 0.999)
    if dev is not None and proportion is not None:
        raise ConfigError(f"{path} [plan]: give dev or dev_proportion, not both")
    out_dir = r.text("out_dir", f"exp/{name}")
    stages = [_stage(path, s, dict(parser.items(s))) for s in parser.sections() if s != "plan"]
    if not stages:
        raise ConfigError(f"{path}: no stage; add a section per stage after [plan]")
    resolved = _resolve(path, stages)
    for stage in resolved:
        if stage.parent is None:
            _check_tunable(path, stage)
    final = r.text("final")
    if final is not None and final not in {s.name for s in resolved}:
        raise r.error("final", f"no such stage; stages: {', '.join(s.name for s in resolved)}")
    return Plan(
        path=path,
        name=name,
        train=train,
        dev=dev,
        dev_proportion=proportion,
        test=r.text("test"),
        url=r.text("url", f"sqlite:///{out_dir}/optim.db"),
        out_dir=out_dir,
        stages=resolved,
        final=final,
        final_epochs=r.number("final_epochs", int, 1),
        workers=r.number("workers", int, 1) or 1,
        heartbeat_interval=r.number("heartbeat_interval", int, 1),
        grace_period=r.number("grace_period", int, 1),
        **r.slurm(),
    )
