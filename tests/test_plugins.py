"""Plugins: the example TDNN encoder package (examples/plugin), installed and tuned.

The package is installed with pip into a directory of this test's own
(``pip install --target``), never into the test venv; the CLI runs as a
subprocess with that directory on ``PYTHONPATH``, where ``importlib.metadata``
finds its entry point.  The test process itself never loads a plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import pytest
from fixtures_data import write_data_dir
from optim_helpers import STAGETUNE, assert_one_line_error, opened_study, write_speech_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin"
TINY = ["model.encoder=tdnn", "tdnn.layers=2", "tdnn.channels=16", "data.batch_size=4", "training.num_epochs=1"]


def _site(tmp: Path, src: Path) -> Path:
    """``src`` (a package directory) installed by pip into ``tmp/site``; its build files stay in ``tmp``."""
    build = tmp / "src"
    shutil.copytree(src, build)  # setuptools writes egg-info beside the sources
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(build)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _site(tmp_path_factory.mktemp("tdnn"), EXAMPLE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_speech_data(root / "train", 16)
    write_speech_data(root / "test", 6)
    return root


def run(args: Sequence[Any], cwd: Path, site: Path | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run(
        [*STAGETUNE, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def sets(items: Sequence[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    with opened_study(url, name) as study:
        return study.get_trials(deepcopy=False)


def test_the_plugins_section_is_read_written_and_validated_like_a_built_in_one(site: Path, tmp_path: Path) -> None:
    ini = tmp_path / "tdnn.ini"
    ini.write_text("[model]\nencoder = tdnn\n[tdnn]\ncontext = 2\n")
    done = run(["--read-ini", ini, "--set", "tdnn.channels=24", "--print-ini"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    section = done.stdout.split("[tdnn]\n", 1)[1]
    assert "channels = 24\n" in section and "context = 2\n" in section and "layers = 3\n" in section
    assert "search [8, 256] log; only if model.encoder == 'tdnn'" in section  # its declared search space
    assert "(str; one of crnn, tdnn; default crnn)" in done.stdout  # model.encoder's choices
    # what --print-ini wrote reads back the same
    (tmp_path / "printed.ini").write_text(done.stdout)
    again = run(["--read-ini", tmp_path / "printed.ini", "--print-ini"], tmp_path, site)
    assert again.stdout == done.stdout
    # its bounds are checked like a built-in field's
    bad = run(["--set", "tdnn.context=9", "--print-ini"], tmp_path, site)
    assert_one_line_error(bad, "--set tdnn.context: got 9; must be <= 5")


def test_without_the_plugin_its_encoder_and_section_are_one_line_errors(tmp_path: Path) -> None:
    done = run(["--set", "model.encoder=tdnn", "--print-ini"], tmp_path, None)
    assert_one_line_error(done, "--set model.encoder: got 'tdnn'; allowed: crnn")
    done = run(["--set", "tdnn.channels=16", "--print-ini"], tmp_path, None)
    assert_one_line_error(done, "unknown parameter 'tdnn.channels'")


def test_a_broken_plugin_is_one_line_naming_it_and_its_distribution(tmp_path: Path) -> None:
    src = tmp_path / "broken"
    (src / "src" / "stagetune_broken").mkdir(parents=True)
    (src / "src" / "stagetune_broken" / "__init__.py").write_text("")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "stagetune-broken"\nversion = "0.1"\n'
        '[project.entry-points."stagetune.encoders"]\nbroken = "stagetune_broken.missing:plugin"\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n'
    )
    site = _site(tmp_path / "install", src)
    done = run(["--print-ini"], tmp_path, site)
    assert_one_line_error(
        done, "plugin 'broken' (stagetune.encoders) of distribution 'stagetune-broken'",
        "cannot load 'stagetune_broken.missing:plugin': ModuleNotFoundError",
    )
    assert run(["--help"], tmp_path, site).returncode == 0  # --help loads no plugin


def test_training_with_the_plugins_encoder(site: Path, corpus: Path, tmp_path: Path) -> None:
    done = run([*sets(TINY), "train", corpus / "train", tmp_path / "model"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    import torch  # the model file holds the [tdnn] section and the TDNN's weights

    stored = torch.load(tmp_path / "model" / "model.pt", map_location="cpu", weights_only=False)
    text = repr(stored)
    assert "'tdnn': {'layers': 2, 'channels': 16, 'context': 1, 'time_stride': 1}" in text
    assert "encoder.convs.1.weight" in text
    evaluated = run(["evaluate", tmp_path / "model" / "model.pt", corpus / "test"], tmp_path, site)
    assert evaluated.returncode == 0, evaluated.stderr


def test_optim_samples_the_plugins_parameters_and_checks_their_memory(
    site: Path, corpus: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    init = run(
        [*sets(TINY), "optim", "--study-name", "t", url, "init", corpus / "train", "--dev-proportion", "0.25",
         "--whitelist", r"tdnn\.(layers|channels|context)", "training\\.learning_rate", "model\\.recurrent_size",
         "--num-trials", "2", "--mem-limit-bytes", "10000000000", "--sampler", "random", "--pruner", "none"],
        tmp_path, site,
    )
    assert init.returncode == 0, init.stderr
    # the crnn's own parameter cannot matter with model.encoder = tdnn: not tuned (and, being
    # another encoder's setting, skipped without a notice)
    tuning = (init.stderr + init.stdout).split("tuning", 1)[1].split(";", 1)[0]
    assert "tdnn.channels" in tuning and "model.recurrent_size" not in tuning
    done = run(["optim", "--study-name", "t", url, "run"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    finished = trials(url, "t")
    assert len(finished) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
    for trial in finished:
        assert {"tdnn.layers", "tdnn.channels", "tdnn.context", "training.learning_rate"} == set(trial.params)
        assert trial.user_attrs["mem_bytes"] > 0  # the memory check ran on the TDNN
    assert len({(t.params["tdnn.channels"], t.params["tdnn.layers"]) for t in finished}) == 2


def test_a_plan_stage_tunes_the_plugins_parameter(site: Path, corpus: Path, tmp_path: Path) -> None:
    plan = tmp_path / "p.ini"
    plan.write_text(
        f"[plan]\ntrain = {corpus / 'train'}\ndev_proportion = 0.25\nout_dir = {tmp_path / 'out'}\n"
        f"[sm]\nset = {' '.join(TINY)}\nwhitelist = tdnn\\.channels\nepochs = 1\ntrials = 2\n"
        "sampler = random\nmetric = loss\nseed = 1\nmem_limit_bytes = 10000000000\n"
    )
    done = run(["plan", plan, "run"], tmp_path, site)
    assert done.returncode == 0, done.stderr + done.stdout
    finished = trials(f"sqlite:///{tmp_path / 'out' / 'optim.db'}", "p-sm")
    assert len(finished) == 2
    assert all(set(t.params) == {"tdnn.channels"} and t.user_attrs["mem_bytes"] > 0 for t in finished)
    assert len({t.params["tdnn.channels"] for t in finished}) == 2


def test_the_memory_check_tells_tdnns_of_different_sizes_apart(site: Path, tmp_path: Path) -> None:
    code = (
        "from stagetune.config import load_config\n"
        "from stagetune.optim.estimate import footprint_key\n"
        "keys = {footprint_key(load_config((), ['model.encoder=tdnn', f'tdnn.channels={c}']), 8, 4, 2, 50, 5,"
        " device='cpu') for c in (16, 256)}\n"
        "assert len(keys) == 2, keys\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr


def test_a_built_in_model_trained_beside_a_plugin_reads_without_it(site: Path, corpus: Path, tmp_path: Path) -> None:
    """Only a chosen plugin's section is stored: a crnn model file trained where the plugin
    is installed evaluates where it is not (no unknown [tdnn] section)."""
    small = sets(["model.convolutional_layers=1", "model.recurrent_size=8", "training.num_epochs=1"])
    done = run([*small, "train", corpus / "train", corpus / "test", tmp_path / "m", "--quiet"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    assert "[tdnn]" not in (tmp_path / "m" / "config.ini").read_text()
    evaluated = run(["evaluate", tmp_path / "m" / "model.pt", corpus / "test"], tmp_path, None)
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_task_plugin_trains_and_evaluates_on_the_targets_it_reads(site: Path, tmp_path: Path) -> None:
    """The example's focal-loss task reads utt2class, as task utt does, and tunes its own gamma."""
    rng = np.random.default_rng(0)
    dirs = {}
    for split, count in (("train", 24), ("dev", 9)):
        feats = {f"u{split}{i:02d}": rng.normal(3.0 * (i % 3), 1.0, size=(12, 6)).astype(np.float32) for i in range(count)}
        dirs[split] = write_data_dir(tmp_path / split, feats)
        (dirs[split] / "utt2class").write_text("".join(f"{u} c{int(u[-2:]) % 3}\n" for u in sorted(feats)))
    args = sets(["model.task=focal", "focal.gamma=1.5", "model.convolutional_layers=1", "model.recurrent_size=8",
                 "training.num_epochs=2", "data.normalization=global"])
    done = run([*args, "train", dirs["train"], dirs["dev"], tmp_path / "m", "--quiet"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    assert "[focal]" in (tmp_path / "m" / "config.ini").read_text()
    evaluated = run(["evaluate", tmp_path / "m" / "model.pt", dirs["dev"], "--out", tmp_path / "hyp"], tmp_path, site)
    assert evaluated.returncode == 0, evaluated.stderr
    assert {line.split()[1] for line in (tmp_path / "hyp").read_text().splitlines()} <= {"c0", "c1", "c2"}
    space = run([*args, "--print-ini"], tmp_path, site)
    assert "gamma = 1.5" in space.stdout
