"""Studies that adapt a base model (``optim init --adapt-from BASE.pt``).

The real CLI in a subprocess on generated Kaldi data: a tiny base trained with
``stagetune train``, a study whose every trial adapts it (``training.adapt_rho``
tuned, the base recorded in each trial's checkpoint and model), ``optim best``
saying what reproducing the best trial needs, a chained study carrying the base
on, workers refusing a base that went missing or changed, and bad bases refused
at init before anything is written.  In-process: the memory check counts the
base's parameters and forward.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from optim_helpers import (
    TINY_MODEL, assert_one_line_error, cli, opened_study, read_spec, study_names, write_speech_data,
)
from optuna.trial import TrialState

from stagetune.adaptation import ADAPT_KEY, file_hash
from stagetune.checkpoint import load_checkpoint, load_model_file, save_model_file
from stagetune.config import load_config, read_ini
from stagetune.model import build_model
from stagetune.optim.memory import estimate_step, footprint_key, measure_step
from stagetune.tasks import task_of

pytestmark = pytest.mark.slow

SETTINGS = [arg for s in TINY_MODEL for arg in ("--set", s)]
TUNED = [r"training\.adapt_rho", r"training\.learning_rate"]
RUN = ["run", "--ckpt-dir", "ckpt", "--keep-models", "--threads", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(data dir, base model.pt)``: the base trained on the data by ``stagetune train``."""
    tmp = tmp_path_factory.mktemp("adapt-study")
    data = write_speech_data(tmp / "data")
    done = cli([*SETTINGS, "train", data, tmp / "base", "--quiet", "--threads", "1"], tmp)
    assert done.returncode == 0, done.stderr
    return data, tmp / "base" / "model.pt"


def _trials(url: str, study_name: str) -> list:
    with opened_study(url, study_name) as study:
        return study.get_trials()


def test_every_trial_adapts_the_base_and_best_says_it_is_needed(tmp_path: Path, trained) -> None:
    data, original = trained
    base = tmp_path / "base.pt"
    shutil.copyfile(original, base)
    identity = {"path": str(base.resolve()), "hash": file_hash(base)}
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    done = cli([*SETTINGS, "optim", url, "init", data, "--adapt-from", base, "--whitelist", *TUNED,
                "--num-trials", "3", "--pruner", "none", "--mem-limit-bytes", str(10**9)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"; adapting {base.resolve()}")
    spec = read_spec(url, "optim")
    assert spec["adapt_from"] == identity
    assert sorted(spec["tuned"]) == ["training.adapt_rho", "training.learning_rate"]

    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    trials = _trials(url, "optim")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    rhos = [t.params["training.adapt_rho"] for t in trials]
    assert all(0 < rho <= 0.9 for rho in rhos) and len(set(rhos)) == 3
    for trial in trials:
        trial_dir = tmp_path / "ckpt" / "optim" / f"trial-{trial.number}"
        model = load_model_file(trial_dir / "model.pt")
        # Trained with the sampled rho, adapting the study's base (fit records what it loaded).
        assert model.config.training.adapt_rho == trial.params["training.adapt_rho"]
        assert model.extra[ADAPT_KEY] == identity
        assert load_checkpoint(trial_dir / "checkpoint.pt")[ADAPT_KEY] == identity
        assert trial.user_attrs["mem_bytes"] > 0

    done = cli(["optim", url, "best", tmp_path / "best.ini", "--model", tmp_path / "best.pt", "--ckpt-dir", "ckpt"],
               tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"train this config with `stagetune train --adapt-from {base.resolve()} ...`" in done.stderr
    text = (tmp_path / "best.ini").read_text()
    assert text.startswith(f"# study optim adapted base model {base.resolve()} (hash {identity['hash'][:8]})")
    best = min(trials, key=lambda t: t.value)
    assert read_ini(tmp_path / "best.ini").training.adapt_rho == best.params["training.adapt_rho"]
    assert load_model_file(tmp_path / "best.pt").extra[ADAPT_KEY] == identity
    # its model not kept where asked: the retraining hint adapts the same base
    done = cli(["optim", url, "best", tmp_path / "b2.ini", "--model", tmp_path / "b2.pt", "--ckpt-dir", "elsewhere"],
               tmp_path)
    assert_one_line_error(done, f"then stagetune --read-ini best.ini train --adapt-from {base.resolve()})")

    # A chained study adapts PREV's base unless told otherwise.
    done = cli(["optim", url, "--study-name", "next", "init", "--from-study", "optim",
                "--whitelist", r"training\.learning_rate", "--num-trials", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_spec(url, "next")["adapt_from"] == identity
    done = cli(["optim", url, "--study-name", "scratch", "init", "--from-study", "optim", "--no-adapt-from",
                "--whitelist", TUNED[1]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_spec(url, "scratch")["adapt_from"] is None

    # The base changed after init: the trial fails naming the file, nothing is trained.
    shutil.copyfile(tmp_path / "ckpt" / "optim" / f"trial-{best.number}" / "model.pt", base)
    done = cli(["optim", url, "--study-name", "next", *RUN, "--n-trials", "1"], tmp_path)
    (failed,) = _trials(url, "next")
    assert failed.state == TrialState.FAIL, done.stderr
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith(f"base model {base.resolve()} (optim init --adapt-from) has changed since")
    assert f"hash {identity['hash'][:8]}, now {file_hash(base)[:8]}" in reason
    assert reason in done.stderr
    assert not (tmp_path / "ckpt" / "next" / "trial-0").exists()
    # ... and a study chained from it now is refused in one line.
    done = cli(["optim", url, "--study-name", "later", "init", "--from-study", "optim",
                "--whitelist", TUNED[1]], tmp_path)
    assert_one_line_error(done, f"adapts base model {base.resolve()}", "which has changed since", "--adapt-from")
    assert "later" not in study_names(url)

    # The base is missing: the same.
    base.unlink()
    done = cli(["optim", url, "--study-name", "next", *RUN, "--n-trials", "1"], tmp_path)
    missing = _trials(url, "next")[1]
    assert missing.state == TrialState.FAIL, done.stderr
    assert missing.user_attrs["fail_reason"] == (
        f"base model {base.resolve()} (optim init --adapt-from) is missing on this worker"
    )


def test_a_bad_base_is_a_one_line_error_and_creates_nothing(tmp_path: Path, trained) -> None:
    data, base = trained
    mf = load_model_file(base)
    wide = tmp_path / "wide.pt"  # a real model file, of features one dimension wider
    model = build_model(mf.config, mf.feat_dim + 1, task_of(mf.config).num_outputs(len(mf.tokens)))
    save_model_file(wide, state_dict=model.state_dict(), config=mf.config, feat_dim=mf.feat_dim + 1,
                    tokens=list(mf.tokens))
    (tmp_path / "notes.txt").write_text("not a model\n")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    cases = [
        (tmp_path / "gone.pt", "no such file"),
        (tmp_path / "notes.txt", "notes.txt"),
        (wide, f"its features have dimension {mf.feat_dim + 1}, this data's {mf.feat_dim}"),
    ]
    for bad, needle in cases:
        done = cli([*SETTINGS, "optim", url, "init", data, "--adapt-from", bad, "--whitelist", *TUNED], tmp_path)
        assert_one_line_error(done, str(bad), needle)
        assert not (tmp_path / "optim.db").exists()  # checked before the database is opened


def test_the_memory_check_counts_the_base_model() -> None:
    torch.set_num_threads(1)
    config = load_config((), [*TINY_MODEL, "training.adapt_rho=0.5"])
    # A base with the same time stride (CTC's outputs must align), larger recurrent layers.
    base = load_config((), [*TINY_MODEL[:3], "model.recurrent_layers=2", "model.recurrent_size=64"])
    feat_dim, num_outputs = 13, 6
    sizes = dict(batch_size=4, max_frames=30, max_target_len=4)
    base_bytes = sum(p.numel() * p.element_size() for p in build_model(base, feat_dim, num_outputs).parameters())

    alone = measure_step(config, feat_dim, num_outputs, device="cpu", **sizes)
    adapting = measure_step(config, feat_dim, num_outputs, device="cpu", base=base, **sizes)
    assert adapting.method == alone.method == "cpu-tracker"
    assert adapting.bytes >= alone.bytes + base_bytes
    # rho = 0: the base is loaded (its parameters count) but its forward never runs.
    plain = load_config((), TINY_MODEL)
    fine_tuning = measure_step(plain, feat_dim, num_outputs, device="cpu", base=base, **sizes)
    assert alone.bytes + base_bytes <= fine_tuning.bytes <= adapting.bytes
    assert len({alone.key, adapting.key, fine_tuning.key}) == 3  # no figure is reused for another

    estimated = estimate_step(config, feat_dim, num_outputs, device="cpu", base=base, **sizes)
    assert estimated.key == adapting.key
    assert estimated.bytes >= estimate_step(config, feat_dim, num_outputs, device="cpu", **sizes).bytes + base_bytes
    # Without a base the key is the one studies without --adapt-from always had.
    assert alone.key == footprint_key(config, feat_dim, num_outputs, *sizes.values(), device="cpu")
