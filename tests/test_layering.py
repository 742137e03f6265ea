"""Import direction: config -> data -> model -> training -> objective -> study -> CLI.

Every module under ``src/stagetune`` is parsed with :mod:`ast` (imports inside
functions count too: a lazy import of a higher layer is still a dependency on
it), and a module may only import modules of its own or lower layers.  Also:
nothing below the optimisation layers imports optuna, and the pure data and
metric modules never import torch, even transitively; and only
``stagetune.optim.optuna_internals`` touches optuna's private API (see
:func:`optuna_violations`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stagetune

SRC = Path(stagetune.__file__).parent
LAYERS = ("config", "data", "model", "training", "objective", "study", "cli")

#: Layer of each top-level module (a new module must be placed here).
MODULE_LAYERS = {
    "stagetune": "config",  # the package itself: __version__
    "stagetune.errors": "config",
    "stagetune.space": "config",
    "stagetune.config": "config",
    "stagetune.signals": "config",  # SIGTERM/SIGINT handlers for a block (prep, training, plan)
    "stagetune.extras": "config",  # optional packages and their pip extras
    "stagetune.packaged": "config",  # shipped configs, plans and Slurm templates by name
    "stagetune.plugins": "config",  # encoders and tasks of installed packages (entry points)
    "stagetune.kaldi": "data",
    "stagetune.kaldi_io": "data",
    "stagetune.tokens": "data",
    "stagetune.audio": "data",
    "stagetune.fbank": "data",
    "stagetune.recordings": "data",
    "stagetune.tempfiles": "data",
    "stagetune.prep": "data",
    "stagetune.dataset": "data",
    "stagetune.normalize": "data",
    "stagetune.corpus": "data",
    "stagetune.demo": "data",
    "stagetune.fsdd": "data",
    "stagetune.fsdd_isolated": "data",  # FSDD's recordings as utterance-classification dirs
    "stagetune.verification": "data",  # EER/minDCF of cosine scores: numpy only
    "stagetune.metrics": "data",
    "stagetune.model": "model",
    "stagetune.tasks": "model",  # the task registry; each task module is listed below
    "stagetune.tasks.base": "model",
    "stagetune.tasks.ctc": "model",
    "stagetune.tasks.frame": "model",
    "stagetune.tasks.utterance": "model",
    "stagetune.tasks.regression": "model",
    "stagetune.tasks.multitask": "model",
    "stagetune.augment": "model",
    "stagetune.failures": "model",
    "stagetune.feasibility": "model",
    "stagetune.schedule": "training",
    "stagetune.checkpoint": "training",
    "stagetune.model_dir": "training",
    "stagetune.epoch": "training",
    "stagetune.step": "training",  # one training step, shared with the memory check
    "stagetune.adaptation": "training",  # --adapt-from: the base model and the adaptation loss
    "stagetune.extract": "training",
    "stagetune.training": "training",
    "stagetune.evaluate": "training",
    "stagetune.optim": "objective",  # the package docstring only
    "stagetune.optim.objective": "objective",
    "stagetune.optim.memory": "objective",
    "stagetune.optim.tracker": "objective",
    "stagetune.optim.estimate": "objective",
    "stagetune.optim.duration": "objective",
    "stagetune.optim.sampling": "objective",
    "stagetune.optim.spec": "objective",
    "stagetune.optim.registry": "objective",
    "stagetune.optim.metrics": "objective",
    "stagetune.optim.optuna_internals": "objective",  # the one door to optuna's private API
    "stagetune.__main__": "cli",
}
#: Modules that must not import torch (not even through another module).
TORCH_FREE = (
    "stagetune.errors", "stagetune.space", "stagetune.config", "stagetune.kaldi",
    "stagetune.kaldi_io", "stagetune.tokens", "stagetune.metrics", "stagetune.audio",
    "stagetune.fbank", "stagetune.recordings", "stagetune.tempfiles", "stagetune.prep",
    "stagetune.normalize", "stagetune.optim.metrics", "stagetune.cli", "stagetune.verification",
    "stagetune.packaged", "stagetune.extras", "stagetune.plugins",
)
#: Layers that must not import optuna.
OPTUNA_FREE_LAYERS = ("config", "data", "model", "training")


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    if module.startswith("stagetune.cli"):
        return "cli"
    if module.startswith("stagetune.optim."):
        return "study"  # workers, storage, analysis: everything not listed as objective
    if module == "stagetune.plan" or module.startswith("stagetune.plan."):
        return "study"  # plans drive studies; only the CLI is above them
    raise AssertionError(f"{module} has no layer; add it to MODULE_LAYERS in {__file__}")


def imports(path: Path, src: Path = SRC) -> set[str]:
    """Absolute names of everything ``path`` (a module under ``src``) imports, anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # ``from stagetune import config`` imports the module stagetune.config.
            found.update(
                f"{base}.{alias.name}" for alias in node.names
                if (src.parent / base.replace(".", "/") / f"{alias.name}.py").exists()
                or (src.parent / base.replace(".", "/") / alias.name / "__init__.py").exists()
            )
    return found


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    rank = LAYERS.index(layer_of(module))
    upward = sorted(
        f"{dep} ({layer_of(dep)})"
        for dep in internal(imports(MODULES[module]))
        if LAYERS.index(layer_of(dep)) > rank
    )
    assert not upward, f"{module} ({layer_of(module)}) imports higher layers: {upward}"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if layer_of(m) in OPTUNA_FREE_LAYERS)
)
def test_training_and_below_never_import_optuna(module: str) -> None:
    names = imports(MODULES[module])
    assert not {n for n in names if n.split(".")[0] == "optuna" or n.startswith("stagetune.optim")}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_data_and_metric_modules_never_import_torch_directly(module: str) -> None:
    path = MODULES[module]
    if module == "stagetune.cli":
        # Commands import torch inside run(); only module level counts here.
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    else:
        names = imports(path)
    assert not {n for n in names if n.split(".")[0] == "torch"}


def test_torch_free_modules_stay_torch_free_transitively() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in TORCH_FREE)
        + "import stagetune.cli; stagetune.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'optuna', 'sqlalchemy') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The AST walk finds lazy and relative imports, so the tests above can fail.
    src = tmp_path / "stagetune"
    src.mkdir()
    (src / "training.py").write_text("")
    source = src / "kaldi.py"
    source.write_text(
        "def f():\n    from .training import fit\n    import optuna\n"
        "from stagetune import training\n"
    )
    assert imports(source, src) == {"stagetune.training", "optuna", "stagetune"}


#: The one module allowed to touch optuna's private API.
OPTUNA_INTERNALS = "stagetune.optim.optuna_internals"
#: ``optuna.storages._rdb``, ``optuna.study._tell.x``: a private optuna module, named anywhere.
_PRIVATE_OPTUNA_PATH = re.compile(r"\boptuna(?:\.\w+)*\.(_[A-Za-z]\w*)")


def optuna_private_names(tmp_dir: Path) -> frozenset[str]:
    """Private names (``_x``, not dunders) of optuna's objects, as installed.

    The members of the classes of live objects (an RDB-backed study, a trial, a
    frozen trial, the storage and optuna's cache in front of it) and the attributes
    those objects hold, plus every name optuna_internals' contract lists.
    """
    import optuna

    from stagetune.optim.optuna_internals import CONTRACT

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_dir / 'names.db'}")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    objects = [study, trial, study.get_trials()[0], storage, study._storage]
    names = {n for o in objects for n in (*vars(o), *dir(type(o)))}
    names |= {name for _, name, _ in CONTRACT}
    storage.engine.dispose()
    return frozenset(n for n in names if n.startswith("_") and not n.startswith("__") and n != "_abc_impl")


def _bases(node: ast.ClassDef) -> list[str]:
    return [ast.unparse(b) for b in node.bases]


def optuna_derived_classes(paths: list[Path]) -> frozenset[str]:
    """Names of the classes in ``paths`` that derive from an optuna class, directly or not.

    A base counts as optuna's when written ``optuna.X`` or imported from an optuna
    module; a class deriving from one of those (by name, in any of ``paths``) counts too.
    """
    classes: dict[str, list[str]] = {}
    derived: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        from_optuna = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "optuna"
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = _bases(node)
                classes[node.name] = bases
                if any(b.startswith("optuna.") or b in from_optuna for b in bases):
                    derived.add(node.name)
    while True:
        more = {name for name, bases in classes.items() if name not in derived and derived.intersection(bases)}
        if not more:
            return frozenset(derived)
        derived |= more


def optuna_violations(path: Path, private: frozenset[str], derived: frozenset[str]) -> list[str]:
    """The ways ``path`` touches optuna's private API, one line each (none: it does not).

    The rule (stagetune's own private attributes stay allowed):

    * text (code, strings, comments, docstrings): no ``optuna.<...>._private`` path,
      so no import of a private optuna module, however spelled;
    * imports: no ``from optuna... import _name``;
    * ``x._name``, ``_name`` a private name of optuna's objects
      (:func:`optuna_private_names`: ``_study_id``, ``_storage``, ``_trial_id``,
      ``_is_multi_objective``, ...), on anything but ``self``/``cls``; on
      ``self``/``cls`` too inside a class that derives from optuna's;
    * no method of such a name in a class that derives from optuna's, nor one
      named as a private callable of optuna_internals' contract in any class (an
      override, or a stand-in for an optuna object);
    * no string literal that is such a name (``getattr(study, "_study_id")``).
    """
    from stagetune.optim.optuna_internals import CONTRACT

    contract_methods = {name for _, name, params in CONTRACT if params is not None and name.startswith("_")}
    source = path.read_text(encoding="utf-8")
    found = [
        f"{path.name}:{source.count(chr(10), 0, m.start()) + 1}: names optuna's private {m.group(0)!r}"
        for m in _PRIVATE_OPTUNA_PATH.finditer(source)
    ]
    tree = ast.parse(source)
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        in_optuna_class = cls.name in derived or any(
            b.startswith("optuna.") for b in _bases(cls)
        )
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                node.name in contract_methods or (in_optuna_class and node.name in private)
            ):
                found.append(f"{path.name}:{node.lineno}: defines optuna's private method {node.name}")
        if in_optuna_class:
            for node in ast.walk(cls):
                if (
                    isinstance(node, ast.Attribute) and node.attr in private
                    and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                ):
                    found.append(f"{path.name}:{node.lineno}: reads optuna's private {node.value.id}.{node.attr}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "optuna":
            found += [
                f"{path.name}:{node.lineno}: imports optuna's private {a.name}"
                for a in node.names if a.name.startswith("_")
            ]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno}: reads optuna's private {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
            found.append(f"{path.name}:{node.lineno}: names optuna's private {node.value!r}")
    return sorted(set(found), key=lambda line: int(line.split(":")[1]))


@pytest.fixture(scope="module")
def optuna_private(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    return optuna_private_names(tmp_path_factory.mktemp("optuna-names"))


def test_the_private_names_include_those_stagetune_used(optuna_private: frozenset[str]) -> None:
    # The rule is only as good as this set: it must know the names stagetune reached for.
    assert {"_study_id", "_storage", "_trial_id", "_is_multi_objective", "_set_trial_param"} <= optuna_private


def test_only_optuna_internals_touches_optuna_private_api(optuna_private: frozenset[str]) -> None:
    derived = optuna_derived_classes(list(MODULES.values()))
    assert "StagetuneStorage" in derived  # through optuna_internals.HookedRDBStorage
    found = [
        line
        for module, path in sorted(MODULES.items())
        if module != OPTUNA_INTERNALS
        for line in optuna_violations(path, optuna_private, derived)
    ]
    assert not found, (
        "optuna's private API is reached only through stagetune.optim.optuna_internals:\n" + "\n".join(found)
    )


def test_the_optuna_checker_sees_violations(tmp_path: Path, optuna_private: frozenset[str]) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import optuna\n"
        "from optuna.storages import _rdb\n"  # 2: a private module, by path and by name
        "import optuna.study._tell as tell\n"  # 3
        "class S(optuna.storages.RDBStorage):\n"
        "    def _set_trial_param(self, *a):\n"  # 5: an override
        "        return self._version_manager\n"  # 6: a private attribute of the optuna base
        "class View:\n"
        "    def _is_multi_objective(self):\n"  # 8: a stand-in for a Study
        "        return False\n"
        "def f(study, trial, frozen):\n"
        "    self_like = study._study_id + trial._trial_id + frozen._trial_id\n"  # 11
        "    return study._storage, getattr(study, '_study_id')\n"  # 12
        "class Own:\n"
        "    def __init__(self, storage):\n"
        "        self._storage = storage\n"  # 15: a class's own private attribute: fine
    )
    found = optuna_violations(bad, optuna_private, optuna_derived_classes([bad]))
    lines = sorted({int(line.split(":")[1]) for line in found})
    assert lines == [2, 3, 5, 6, 8, 11, 12], "\n".join(found)
    assert any("study._study_id" in line for line in found)
    assert any("trial._trial_id" in line for line in found) and any("frozen._trial_id" in line for line in found)
    assert any("'_study_id'" in line for line in found) and any("study._storage" in line for line in found)
