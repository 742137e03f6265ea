"""Installed, not only checked out: environment.yaml, package data, sdist and wheel.

The end-to-end test builds the sdist from this checkout, a wheel from the
unpacked sdist (as ``python -m build`` does), installs the wheel into a fresh
venv and runs it from an empty directory: ``--version``, the packaged configs,
the Slurm template, ``stagetune demo --size tiny`` end to end and a training
with a packaged config.  The fresh venv gets only the wheel; its heavy
dependencies (torch, optuna, ...) are the test venv's, reached through a
``.pth`` line (the test venv's own ``.pth`` files, among them the editable
install's, are not read that way, so ``stagetune`` is the wheel's).
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import stagetune
from stagetune.cli.demo import demo_plan_text
from stagetune.config import load_config
from stagetune.errors import ConfigError
from stagetune.packaged import CONF_DIR, config_names, resolve, slurm_templates
from stagetune.plan.spec import read_plan

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
#: pip name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "psycopg2-binary": "psycopg2", "matplotlib": "matplotlib-base"}
#: What every install must ship (paths inside the package).
PACKAGE_DATA = (
    "conf/demo.ini", "conf/optim/model-sm.ini", "conf/optim/train-sm.ini",
    "conf/plans/demo.ini", "conf/plans/cnn-mellin.ini", "slurm/optim-worker.sbatch",
)


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _pyproject_requirements() -> dict[str, Requirement]:
    """Every requirement of the project and its extras, by normalised name (self-references left out)."""
    project = PYPROJECT["project"]
    found: dict[str, Requirement] = {}
    for line in [*project["dependencies"], *(r for rs in project["optional-dependencies"].values() for r in rs)]:
        req = Requirement(line)
        if _name(req.name) != "stagetune":
            found.setdefault(_name(req.name), req)
    return found


def test_environment_yaml_has_every_pyproject_dependency_with_its_pin() -> None:
    env = yaml.safe_load((REPO / "environment.yaml").read_text(encoding="utf-8"))
    assert env["channels"][0] == "conda-forge" and not {"pytorch", "nvidia", "defaults"} & set(env["channels"])
    conda: dict[str, SpecifierSet] = {}
    for entry in env["dependencies"]:
        if isinstance(entry, str):
            name, spec = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry.strip()).groups()  # type: ignore[union-attr]
            conda[_name(name)] = SpecifierSet(spec.replace("=", "==") if re.fullmatch(r"=[\d.*]+", spec) else spec)
    assert conda["python"] == SpecifierSet("==3.11")
    assert "cuda-version" in conda and "pytorch-gpu" in conda  # the CUDA build, not the CPU one
    for name, req in _pyproject_requirements().items():
        conda_name = _name(CONDA_NAMES.get(name, name))
        assert conda_name in conda, f"{req} (pyproject.toml) is missing from environment.yaml as {conda_name}"
        assert conda[conda_name] == req.specifier, f"{req}: environment.yaml pins {conda_name}{conda[conda_name]}"
    # the CPU test venv's torch satisfies the lower bound pyproject declares
    from importlib.metadata import version

    assert _pyproject_requirements()["torch"].specifier.contains(version("torch").split("+")[0])


def test_readme_says_which_cuda_the_environment_gives() -> None:
    text = (REPO / "environment.yaml").read_text(encoding="utf-8")
    version = re.search(r"^\s*-\s*cuda-version\s*=\s*([\d.]+)", text, re.M)
    assert version, "environment.yaml pins no cuda-version"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"CUDA {version.group(1)}" in readme and "environment.yaml" in readme


def test_all_extra_is_every_other_extra() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    (all_req,) = extras["all"]
    assert set(Requirement(all_req).extras) == set(extras) - {"all", "test"}


def test_packaged_configs_are_found_by_name_and_are_the_checkout_files() -> None:
    assert set(config_names()) >= {"demo", "optim/model-sm", "optim/train-sm", "plans/demo", "plans/cnn-mellin"}
    for name in PACKAGE_DATA:
        assert (stagetune.packaged.PACKAGE_DIR / name).is_file(), name
    # one copy of each file: in a checkout the package dirs link to conf/ and slurm/
    assert CONF_DIR.resolve() == (REPO / "conf").resolve()
    assert slurm_templates()["optim-worker"].read_bytes() == (REPO / "slurm" / "optim-worker.sbatch").read_bytes()
    assert resolve("@optim/model-sm") == resolve("@optim/model-sm.ini") == CONF_DIR / "optim" / "model-sm.ini"
    assert resolve("x/y.ini") == Path("x/y.ini")
    config = load_config(["@optim/model-sm"])
    assert config.training.num_time_mask == 0 and config.training.early_stopping_threshold == 0.0
    with pytest.raises(ConfigError, match=r"@optim/nope: no packaged config named 'optim/nope'; packaged: .*@optim/model-sm"):
        load_config(["@optim/nope"])
    with pytest.raises(ConfigError, match=r"no packaged plan .*packaged: @plans/cnn-mellin, @plans/demo \("):
        resolve("@plans/../demo", "plan")


def test_demo_plan_points_into_its_directory_and_tiny_cuts_every_stage(tmp_path: Path) -> None:
    full = tmp_path / "full.ini"
    full.write_text(demo_plan_text("out/x", "full"))
    packaged = read_plan(resolve("@plans/demo", "plan"))
    plan = read_plan(full)
    assert (plan.train, plan.dev, plan.test) == ("out/x/data/train", "out/x/data/dev", "out/x/data/test")
    assert (plan.url, plan.out_dir) == ("sqlite:///out/x/optim.db", "out/x")
    assert [(s.name, s.trials, s.epochs) for s in plan.stages] == [
        (s.name, s.trials, s.epochs) for s in packaged.stages
    ]
    assert plan.final_epochs == packaged.final_epochs
    tiny = tmp_path / "demo.ini"
    tiny.write_text(demo_plan_text("d", "tiny"))
    cut = read_plan(tiny)
    assert cut.name == "demo" and cut.final_epochs == 1
    assert all(s.epochs == 1 and s.trials <= (1 if s.parent else 2) for s in cut.stages)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(tiny.read_text())  # a plain INI file
    assert tiny.read_text().startswith("# stagetune demo --size tiny:")


def test_a_plan_reads_packaged_configs_by_name(tmp_path: Path) -> None:
    plan = tmp_path / "p.ini"
    plan.write_text("[plan]\ntrain = data/train\n\n[sm]\nconfig = @optim/model-sm\nset = data.batch_size=4\n"
                    "blacklist = training\\..* data\\..*\ntrials = 2\n")
    assert read_plan(plan).stages[0].config == ("@optim/model-sm",)
    plan.write_text(plan.read_text().replace("@optim/model-sm", "@optim/model-xl"))
    with pytest.raises(ConfigError, match=r"\[sm\] config/set: @optim/model-xl: no packaged config"):
        read_plan(plan)


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_sdist_and_wheel_install_into_a_fresh_venv_and_run_from_an_empty_directory(tmp_path: Path) -> None:
    started = time.monotonic()
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # sdist from the checkout (the links become files), then the wheel from the unpacked sdist
    dist = tmp_path / "dist"
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"
    sdist = dist / _run([python, "-c", code], REPO, env).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "sdist", filter="data")
    root = f"{sdist.name.removesuffix('.tar.gz')}/src/stagetune/"
    for name in PACKAGE_DATA:
        assert root + name in names, f"{name} missing from {sdist.name}"
    unpacked = tmp_path / "sdist" / sdist.name.removesuffix(".tar.gz")
    _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(unpacked)], tmp_path, env)
    (wheel,) = dist.glob("stagetune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    for name in PACKAGE_DATA:
        assert f"stagetune/{name}" in shipped, f"{name} missing from {wheel.name}"
    # a fresh venv holding only the wheel; its dependencies are the test venv's
    venv = tmp_path / "venv"
    _run([python, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    _run([python, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], tmp_path, env)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path, env).stdout.strip())
    (site / "test-venv-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    built = time.monotonic() - started
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    empty = tmp_path / "empty"
    empty.mkdir()
    # a subdirectory of the empty one: nothing of the checkout is in reach
    where = _run(["python", "-c", "import stagetune; print(stagetune.__file__)"], empty, env).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    version = PYPROJECT["project"]["version"]
    assert _run(["stagetune", "--version"], empty, env).stdout.strip() == f"stagetune {version}"
    listed = _run(["stagetune", "list-configs"], empty, env).stdout
    assert "@optim/model-sm" in listed and "@plans/demo" in listed and str(venv) in listed
    _run(["stagetune", "slurm-template", "worker.sbatch"], empty, env)
    assert os.access(empty / "worker.sbatch", os.X_OK)
    assert (empty / "worker.sbatch").read_bytes() == (REPO / "slurm" / "optim-worker.sbatch").read_bytes()
    # the demo end to end at its smallest, then a training with a packaged config on its corpus
    demo = _run(["stagetune", "demo", "d", "--size", "tiny"], empty, env, timeout=600)
    assert "plan demo: done" in demo.stdout and "best found,     test: TER" in demo.stdout, demo.stdout
    for path in ("d/final/model.pt", "d/default/model.pt", "d/test.result", "d/default.result", "d/demo.ini"):
        assert (empty / path).is_file(), path
    demo_s = time.monotonic() - started - built
    _run(["stagetune", "--read-ini", "@optim/model-sm", "--set", "training.num_epochs=1", "train",
          "d/data/train", "d/data/dev", "model", "--threads", "1", "--quiet"], empty, env)
    assert len((empty / "model" / "history.csv").read_text().splitlines()) == 2  # header + 1 epoch
    assert sorted(p.name for p in empty.iterdir()) == ["d", "model", "worker.sbatch"]
    print(f"build + install {built:.1f} s, demo {demo_s:.1f} s, total {time.monotonic() - started:.1f} s")
