"""Import direction: config -> data -> model -> training -> objective -> study -> CLI.

Every module under ``src/stagetune`` is parsed with :mod:`ast` (imports inside
functions count too: a lazy import of a higher layer is still a dependency on
it), and a module may only import modules of its own or lower layers.  Also:
nothing below the optimisation layers imports optuna, and the pure data and
metric modules never import torch, even transitively.
"""

from __future__ import annotations

import ast
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
    "stagetune.metrics": "data",
    "stagetune.model": "model",
    "stagetune.augment": "model",
    "stagetune.failures": "model",
    "stagetune.feasibility": "model",
    "stagetune.schedule": "training",
    "stagetune.checkpoint": "training",
    "stagetune.model_dir": "training",
    "stagetune.epoch": "training",
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
    "stagetune.__main__": "cli",
}
#: Modules that must not import torch (not even through another module).
TORCH_FREE = (
    "stagetune.errors", "stagetune.space", "stagetune.config", "stagetune.kaldi",
    "stagetune.kaldi_io", "stagetune.tokens", "stagetune.metrics", "stagetune.audio",
    "stagetune.fbank", "stagetune.recordings", "stagetune.tempfiles", "stagetune.prep",
    "stagetune.normalize", "stagetune.optim.metrics", "stagetune.cli",
    "stagetune.packaged", "stagetune.extras",
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
