"""The contract with optuna's private API: an optuna release that moves a name fails here.

stagetune reaches optuna's private names only through
:mod:`stagetune.optim.optuna_internals`, which lists each in ``CONTRACT``. Every
entry is checked against the installed optuna (module importable, attribute there,
a callable's leading parameters unchanged), with the entry as the test id, so the
failure names the symbol. The tables, columns and stored state names stagetune's
raw SQL uses are checked against optuna's models, and the helpers are exercised
on a real SQLite study. A last test keeps ``CONTRACT`` complete: every private
name optuna_internals' own code uses must be listed in it.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import text

import stagetune

optuna.logging.set_verbosity(optuna.logging.WARNING)
# The heartbeat options are experimental in optuna, and it wants them used with optimize().
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

INTERNALS = Path(stagetune.__file__).parent / "optim" / "optuna_internals.py"


def _contract() -> tuple[tuple[str, str, tuple[str, ...] | None], ...]:
    """optuna_internals.CONTRACT, read from its source: it cannot be imported once optuna moved a name."""
    for node in ast.parse(INTERNALS.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "CONTRACT":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{INTERNALS} defines no CONTRACT")


CONTRACT = _contract()


@pytest.fixture(scope="module")
def oi() -> ModuleType:
    """stagetune.optim.optuna_internals (its import fails, naming the symbol, if optuna moved one)."""
    return importlib.import_module("stagetune.optim.optuna_internals")


@pytest.fixture
def storage(oi: ModuleType, tmp_path: Path) -> Iterator[Any]:
    """A HookedRDBStorage on a new SQLite file that records the hooks optuna calls."""

    class Recording(oi.HookedRDBStorage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.params: list[tuple[int, str]] = []
            self.stale_asked: list[int] = []

        def put_trial_param(self, trial_id: int, param_name: str, *rest: Any) -> None:
            self.params.append((trial_id, param_name))
            super().put_trial_param(trial_id, param_name, *rest)

        def stale_trial_ids(self, study_id: int) -> list[int]:
            self.stale_asked.append(study_id)
            return super().stale_trial_ids(study_id)

    storage = Recording(f"sqlite:///{tmp_path / 'contract.db'}", heartbeat_interval=1, grace_period=1)
    yield storage
    storage.engine.dispose()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One live object per optuna class the contract names (instance attributes are checked on it)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path_factory.mktemp('live') / 'live.db'}")
    study = optuna.create_study(study_name="contract", storage=storage)
    trial = study.ask()
    yield {
        "optuna.study:Study": study,
        "optuna.trial:Trial": trial,
        "optuna.trial:FrozenTrial": study.get_trials()[0],
        "optuna.storages:RDBStorage": storage,
    }
    storage.engine.dispose()


def _resolve(where: str) -> Any:
    module_name, _, cls = where.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.fail(f"optuna {optuna.__version__}: module {module_name} is gone ({exc}); update optuna_internals")
    if not cls:
        return module
    assert hasattr(module, cls), f"optuna {optuna.__version__}: {module_name}.{cls} is gone; update optuna_internals"
    return getattr(module, cls)


@pytest.mark.parametrize(("where", "name", "params"), CONTRACT, ids=[f"{w}.{n}" for w, n, _ in CONTRACT])
def test_each_private_name_is_still_there(
    where: str, name: str, params: tuple[str, ...] | None, live: dict[str, Any]
) -> None:
    owner = _resolve(where)
    if not hasattr(owner, name):  # an instance attribute: look on a live object
        assert where in live, f"optuna {optuna.__version__}: {where}.{name} is gone; update optuna_internals"
        owner = live[where]
    symbol = f"{where}.{name}"
    assert hasattr(owner, name), f"optuna {optuna.__version__}: {symbol} is gone; update optuna_internals"
    if params is not None:
        target = getattr(owner, name)
        assert callable(target), f"{symbol} is no longer callable"
        got = tuple(inspect.signature(inspect.unwrap(target)).parameters)[: len(params)]
        assert got == params, f"optuna {optuna.__version__}: {symbol} now takes {got}, stagetune passes {params}"


def test_the_tables_and_columns_raw_sql_names_exist(oi: ModuleType) -> None:
    tables = oi.models.BaseModel.metadata.tables
    for table, columns in oi.SQL_COLUMNS.items():
        assert table in tables, f"optuna {optuna.__version__} has no table {table!r} (stagetune's raw SQL reads it)"
        missing = columns - set(tables[table].c.keys())
        assert not missing, f"optuna {optuna.__version__}: table {table!r} lost columns {sorted(missing)}"
        assert table in oi.OPTUNA_TABLES
    named = {oi.STUDIES, oi.TRIALS, oi.TRIAL_VALUES, oi.TRIAL_PARAMS, oi.TRIAL_HEARTBEATS, oi.TRIAL_USER_ATTRS,
             oi.TRIAL_SYSTEM_ATTRS}
    assert named == set(oi.SQL_COLUMNS) and len(named) == 7


def test_trial_states_are_stored_by_their_names(oi: ModuleType) -> None:
    # Raw SQL compares trials.state with DbState's values: the stored form of TrialState.
    stored = set(oi.models.TrialModel.__table__.c.state.type.enums)
    assert stored == {s.name for s in TrialState}, f"optuna {optuna.__version__} stores trial states as {stored}"
    names = {v for k, v in vars(oi.DbState).items() if not k.startswith("_")}
    assert names == {"RUNNING", "WAITING", "COMPLETE", "PRUNED", "FAIL"} and names <= stored


def test_the_helpers_on_a_real_sqlite_study(oi: ModuleType, storage: Any) -> None:
    study = optuna.create_study(study_name="helpers", storage=storage)
    trial = study.ask()
    sid, tid = oi.study_id_of(study), oi.trial_id_of(trial)
    assert sid == storage.get_study_id_from_name("helpers")
    assert tid == storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
    assert oi.storage_of(study).get_trial(tid).number == trial.number
    assert oi.trial_id_of(study.get_trials()[0]) == tid

    # Every suggest_* reaches the parameter hook (through optuna's storage cache).
    x = trial.suggest_float("x", 0.0, 1.0)
    assert storage.params == [(tid, "x")]

    # Raw SQL as stagetune writes it: table names and state values from optuna_internals.
    with storage.engine.connect() as conn:
        state = conn.execute(text(f"SELECT state FROM {oi.TRIALS} WHERE trial_id = :tid"), {"tid": tid}).scalar()
        assert state == oi.DbState.RUNNING
        stored = conn.execute(
            text(f"SELECT param_value FROM {oi.TRIAL_PARAMS} WHERE trial_id = :tid"), {"tid": tid}
        ).scalar()
        assert stored == pytest.approx(x)

    state, values, _ = oi.tell_with_warning(study, trial, 0.5)
    assert state == TrialState.COMPLETE and values == [0.5]
    assert study.best_trial.value == 0.5
    with storage.engine.connect() as conn:
        state = conn.execute(text(f"SELECT state FROM {oi.TRIALS} WHERE trial_id = :tid"), {"tid": tid}).scalar()
        assert state == oi.DbState.COMPLETE

    # optuna's session commits on exit; its models write optuna's rows.
    with oi.create_scoped_session(storage.scoped_session) as session:
        session.add(oi.models.StudyUserAttributeModel(study_id=sid, key="k", value_json='"v"'))
    assert storage.get_study_user_attrs(sid) == {"k": "v"}


def test_the_stale_sweep_asks_the_hook(oi: ModuleType, storage: Any) -> None:
    study = optuna.create_study(study_name="stale", storage=storage)
    trial = study.ask()
    tid = oi.trial_id_of(trial)
    storage.record_heartbeat(tid)
    old = datetime.datetime.now() - datetime.timedelta(hours=1)
    with oi.create_scoped_session(storage.scoped_session) as session:
        session.query(oi.models.TrialHeartbeatModel).filter_by(trial_id=tid).update({"heartbeat": old})
    optuna.storages.fail_stale_trials(study)
    assert storage.stale_asked == [oi.study_id_of(study)]
    assert study.trials[0].state == TrialState.FAIL


def test_importance_accepts_the_study_view(oi: ModuleType) -> None:
    # optuna.importance asks a study whether it is multi-objective by a private method.
    dist = optuna.distributions.FloatDistribution(0, 1)
    trials = [
        optuna.trial.create_trial(params={"a": a, "b": b}, distributions={"a": dist, "b": dist}, value=a * a)
        for a, b in [(i / 10, (i * 7 % 10) / 10) for i in range(10)]
    ]
    importances = optuna.importance.get_param_importances(
        oi.StudyView("view", trials), evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=["a", "b"]
    )
    assert list(importances)[0] == "a"  # the value depends on a only


def _private_names_used(path: Path) -> set[tuple[str, str]]:
    """``(where, name)`` of each private optuna name the module's code uses, as CONTRACT spells them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
            private_module = any(part.startswith("_") for part in node.module.split("."))
            used |= {(node.module, a.name) for a in node.names if private_module or a.name.startswith("_")}
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            used.add(("", node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
            if not node.name.startswith("__"):
                used.add(("", node.name))
    return used


def test_the_contract_lists_every_private_name_optuna_internals_uses(oi: ModuleType) -> None:
    assert oi.CONTRACT == CONTRACT
    listed = {(where.partition(":")[0], name) for where, name, _ in CONTRACT}
    names = {name for _, name, _ in CONTRACT}
    unlisted = sorted(
        f"{where}.{name}" if where else name
        for where, name in _private_names_used(INTERNALS)
        if ((where, name) not in listed if where else name not in names)
    )
    assert not unlisted, f"optuna_internals uses private names its CONTRACT does not list: {unlisted}"


def test_a_storage_opened_to_read_skips_alembic_and_can_still_check_its_schema(tmp_path: Path) -> None:
    """``status``/``important``/``best`` open the storage without optuna's alembic set-up (0.4 s)."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'optim.db'}"
    optuna.create_study(study_name="s", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    probe = (
        "import sys\n"
        "from stagetune.optim.optuna_internals import HookedRDBStorage, check_schema\n"
        f"s = HookedRDBStorage({url!r}, skip_compatibility_check=True, skip_table_creation=True)\n"
        "n = len(s.get_all_trials(s.get_study_id_from_name('s')))\n"
        "print(n, 'alembic' in sys.modules)\n"
        "check_schema(s)\n"  # still works (imports alembic now)
        f"w = HookedRDBStorage({url!r})\n"  # an ordinary open sets alembic up
        "print('alembic' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "False", "True"]
