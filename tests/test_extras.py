"""Optional features without their packages: one line naming the extra, nothing stored.

The real CLI runs in a subprocess whose ``PYTHONPATH`` starts with a directory of
stand-in modules (``cmaes``, ``scipy``, ``sklearn``) that raise
``ModuleNotFoundError`` as a missing package does, so the installed packages stay
untouched.  Every command must exit non-zero with a single ``stagetune: error:``
line naming ``pip install 'stagetune[EXTRA]'`` and leave the study as it was.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from optim_helpers import (
    STAGETUNE,
    assert_one_line_error,
    fill_study,
    study_names,
    trial_states,
    write_speech_data,
)
from stagetune.config import load_config
from stagetune.extras import MissingExtra, require_evaluator, require_sampler
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study

_MISSING = 'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'


def _blocked(tmp_path: Path, *modules: str) -> dict[str, str]:
    """The environment of a process in which ``modules`` are not installed."""
    stand_ins = tmp_path / f"without-{'-'.join(modules)}"
    stand_ins.mkdir(exist_ok=True)
    for name in modules:
        (stand_ins / f"{name}.py").write_text(_MISSING.format(name=name))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stand_ins), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*STAGETUNE, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _done(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _objective(values: dict[str, float]) -> float:
    return abs(values["training.learning_rate"] - 0.003) + 0.1 * values["training.dropout_prob"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two studies with 4 completed trials each: ``tpe`` samples with TPE, ``cma`` with CMA-ES."""
    root = tmp_path_factory.mktemp("extras")
    data = write_speech_data(root / "data")
    url = f"sqlite:///{root / 'optim.db'}"
    with storage_session(url) as storage:
        for name, sampler in (("tpe", "tpe"), ("cma", "cmaes")):
            spec = build_spec(
                load_config((), ["training.num_epochs=1"]), data,
                whitelist=["training.learning_rate", "training.dropout_prob"], num_trials=8, pruner="none",
            )
            spec.sampler = sampler
            init_study(storage, name, url, spec, log=lambda _m: None)
    for name in ("tpe", "cma"):
        fill_study(url, name, spec, 4, _objective)
    return root, url


def test_every_command_refuses_in_one_line_and_stores_nothing(studies: tuple[Path, str]) -> None:
    root, url = studies
    before = {name: trial_states(url, name) for name in ("tpe", "cma")}
    no_sklearn, no_cmaes, no_scipy = (_blocked(root, m) for m in ("sklearn", "cmaes", "scipy"))
    data = str(root / "data")
    cases = [
        # (argv, env, needles)
        (["optim", "--study-name", "tpe", url, "important", "--evaluator", "mdi"], no_sklearn,
         ("--evaluator mdi", "scikit-learn", "stagetune[importance]")),
        (["optim", "--study-name", "tpe", url, "run", "--sampler", "cmaes", "--n-trials", "1"], no_cmaes,
         ("--sampler cmaes", "cmaes", "stagetune[samplers]")),
        # the study's own sampler (optim init --sampler cmaes), in a pool: one line, not one per worker
        (["optim", "--study-name", "cma", url, "run", "--workers", "2", "--n-trials", "1"], no_cmaes,
         ("--sampler cmaes", "stagetune[samplers]")),
        (["optim", "--study-name", "tpe", url, "run", "--sampler", "gp", "--n-trials", "1"], no_scipy,
         ("--sampler gp", "scipy", "stagetune[samplers]")),
        (["--set", "training.num_epochs=1", "optim", "--study-name", "new2", url, "init", data,
          "--sampler", "cmaes"], no_cmaes, ("--sampler cmaes", "stagetune[samplers]")),
    ]
    # Two at a time: each pays its imports, and the machine is shared.
    results = []
    for start in range(0, len(cases), 2):
        procs = [_run(argv, root, env) for argv, env, _ in cases[start : start + 2]]
        results += [_done(p) for p in procs]
    for (argv, _, needles), done in zip(cases, results):
        line = assert_one_line_error(done, *needles)
        assert done.returncode == 1, (argv, line)
    after = {name: trial_states(url, name) for name in ("tpe", "cma")}
    assert after == before  # no trial asked for, none failed
    assert sorted(study_names(url)) == ["cma", "tpe"]  # init created nothing


def test_present_packages_pass_and_the_rest_need_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cmaes", types.ModuleType("cmaes"))  # installed (a slow import)
    require_sampler("cmaes")
    for name in ("tpe", "random", "nsgaii"):
        monkeypatch.setitem(sys.modules, "scipy", None)
        require_sampler(name)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    require_evaluator("ped-anova")


def test_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cmaes", None)  # what an uninstalled package looks like
    with pytest.raises(MissingExtra) as raised:
        require_sampler("cmaes")
    assert str(raised.value) == (
        "--sampler cmaes needs cmaes, which is not installed: pip install 'stagetune[samplers]' (or stagetune[all])"
    )
