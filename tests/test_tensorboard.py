"""``train --tensorboard DIR``: per-epoch scalars read back with TensorBoard's own event reader."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from optim_helpers import assert_one_line_error, cli, write_speech_data
from test_optim_manage import read_board

TINY = ["--set", "training.num_epochs=2", "--set", "model.convolutional_layers=0", "--set", "model.recurrent_layers=1",
        "--set", "model.recurrent_size=8", "--set", "data.batch_size=4"]


def test_train_writes_every_epoch_for_tensorboard(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    done = cli([*TINY, "train", data, tmp_path / "model", "--dev-proportion", "0.25", "--quiet",
                "--tensorboard", tmp_path / "tb"], tmp_path)
    assert done.returncode == 0, done.stderr
    with (tmp_path / "model" / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    scalars, hparams = read_board(tmp_path / "tb")
    for tag, column in (("train/loss", "train_loss"), ("dev/error", "dev_error"), ("dev/loss", "dev_loss"),
                        ("train/learning_rate", "learning_rate")):
        assert scalars[tag] == [(int(row["epoch"]), pytest.approx(float(row[column]), rel=1e-4)) for row in history]
    assert [step for step, _ in scalars["dev/error"]] == [1, 2] and hparams == {}


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['tensorboard'] = None; from stagetune.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "optim", f"sqlite:///{tmp_path / 'x.db'}", "run",
                           "--tensorboard", "tb"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_line_error(done, "--tensorboard needs tensorboard", "pip install 'stagetune[tensorboard]'")
    assert not (tmp_path / "tb").exists() and not (tmp_path / "x.db").exists()
