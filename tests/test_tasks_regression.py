"""Frame regression (task ``regress``) and multitask (task ``multi``): CCC, reading targets,
training, ``evaluate`` and ``optim`` through the real CLI on real Kaldi dirs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import kaldiio
import numpy as np
import optuna
import pytest
import torch
from fixtures_data import write_data_dir
from optim_helpers import assert_one_line_error, cli

from stagetune.checkpoint import load_model_file
from stagetune.config import load_config
from stagetune.corpus import load_corpus
from stagetune.dataset import UtteranceDataset, collate
from stagetune.errors import ConfigError, DataError
from stagetune.kaldi import load_data_dir
from stagetune.metrics import RegressionStats, concordance_correlation
from stagetune.optim.estimate import estimate_step, run_synthetic_step
from stagetune.tasks import TASKS, MultiTask, RegressionTask, task_of
from stagetune.tasks.regression import subsample_values

torch.set_num_threads(1)

SMALL = [
    "--set", "model.convolutional_layers=1", "--set", "model.convolutional_initial_channels=4",
    "--set", "model.recurrent_layers=1", "--set", "model.recurrent_size=24", "--set", "data.normalization=global",
    "--set", "training.num_time_mask=0", "--set", "training.num_freq_mask=0", "--set", "training.dropout_prob=0",
    "--set", "training.warmup_updates=10",
]
WINDOW = 3  # the target at frame t is the mean of feature 0 over frames t-3 .. t+3


def _windowed_mean(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, WINDOW, mode="edge")
    return np.convolve(padded, np.ones(2 * WINDOW + 1) / (2 * WINDOW + 1), mode="valid")


def _regression_data(path: Path, num_utts: int, seed: int, *, form: str = "scp", labels: bool = False) -> Path:
    """Targets that need context: a moving average of feature 0 (plus its frame label for multitask)."""
    rng = np.random.default_rng(seed)
    feats, values, utt2label = {}, {}, {}
    for i in range(num_utts):
        utt = f"u{seed}-{i:03d}"
        mat = rng.normal(0.0, 1.0, size=(int(rng.integers(20, 40)), 5)).astype(np.float32)
        feats[utt] = mat
        values[utt] = (2.0 * _windowed_mean(mat[:, 0])).astype(np.float32)[:, None]
        utt2label[utt] = (mat[:, 1] > 0).astype(int).tolist()
    directory = write_data_dir(path, feats, utt2label=utt2label if labels else None)
    if form == "scp":
        kaldiio.save_ark(str(directory / "targets.ark"), values, scp=str(directory / "targets.scp"))
    else:
        (directory / "utt2value").write_text(
            "".join(f"{u} {' '.join(f'{v:.6f}' for v in m[:, 0])}\n" for u, m in values.items())
        )
    return directory


# --- CCC --------------------------------------------------------------------------------------


def test_ccc_agrees_with_hand_computed_cases() -> None:
    # x = 1 2 3 4, y = 2 3 4 5: var_x = var_y = 1.25, cov = 1.25, mean difference 1
    # -> 2 * 1.25 / (1.25 + 1.25 + 1) = 2.5 / 3.5
    assert concordance_correlation([1, 2, 3, 4], [2, 3, 4, 5]) == pytest.approx(2.5 / 3.5)
    assert concordance_correlation([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert concordance_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # y = 2x: var_x = 2/3, var_y = 8/3, cov = 4/3, means 2 and 4 -> (8/3) / (2/3 + 8/3 + 4) = 4/11
    assert concordance_correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(4 / 11)
    assert concordance_correlation([5, 5, 5], [1, 2, 3]) == pytest.approx(0.0)  # a constant guess
    with pytest.raises(ValueError):
        concordance_correlation([1, 2], [1])


def test_regression_stats_sum_over_batches_and_average_dimensions() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    y[:, 1] = 0.5 * x[:, 1] + 0.1
    stats = RegressionStats()
    for start in range(0, 50, 7):  # batch by batch, as validation adds them
        stats.add(x[start:start + 7], y[start:start + 7])
    per_dim = [concordance_correlation(x[:, d], y[:, d]) for d in range(2)]
    assert stats.ccc() == pytest.approx(np.mean(per_dim))
    assert stats.mse() == pytest.approx(float(((x - y) ** 2).mean()))


# --- targets, batches, loss -------------------------------------------------------------------


def test_targets_scp_and_utt2value_are_read_as_float_frames_and_batched(tmp_path: Path) -> None:
    scp = load_data_dir(_regression_data(tmp_path / "a", 4, 0), task="regress")
    text = load_data_dir(_regression_data(tmp_path / "b", 4, 0, form="text"), task="regress")
    utt = scp.utt_ids[0]
    assert scp.targets(utt).dtype == np.float32 and scp.targets(utt).shape == (scp.num_frames[utt], 1)
    assert np.allclose(scp.targets(utt), text.targets(utt), atol=1e-5)
    batch = collate([UtteranceDataset(scp, scp.utt_ids)[i] for i in range(4)])
    assert batch.targets.dtype == torch.float32 and batch.targets.shape[2] == 1
    assert batch.target_lens.tolist() == [scp.num_frames[u] for u in scp.utt_ids]
    multi = load_data_dir(_regression_data(tmp_path / "c", 3, 0, labels=True), task="multi")
    row = multi.targets(multi.utt_ids[0])
    assert row.shape[1] == 2 and set(np.unique(row[:, 0])) <= {0.0, 1.0}
    assert load_corpus(tmp_path / "c", tmp_path / "c", task="multi").token_symbols == ["0", "1", "dim:0"]


def test_the_loss_is_mse_over_valid_frames_at_the_output_rate() -> None:
    task = TASKS["regress"]
    targets = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    lens = torch.tensor([6, 3])
    sub, valid = subsample_values(targets, lens, 2, out_lens=torch.tensor([3, 2]), num_frames=3)
    # centres of the stride windows: frames 1, 3, 5; the second utterance's frame 3 is clamped to 2
    assert sub[0, :, 0].tolist() == [1, 3, 5] and sub[1, :2, 0].tolist() == [7, 8]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    logits = torch.zeros(2, 3, 1)
    loss = task.loss(logits, torch.tensor([3, 2]), targets, lens, time_stride=2)
    assert loss.item() == pytest.approx((1 + 9 + 25 + 49 + 64) / 5)
    summed, units = task.summed_loss(logits, torch.tensor([3, 2]), targets, lens, time_stride=2)
    assert units == 5 and summed.item() == pytest.approx(148)


def test_multitask_loss_is_the_weighted_sum_of_the_sub_task_losses() -> None:
    config = load_config((), ["model.task=multi", "training.task_weights=1.0,0.5"])
    task = task_of(config)
    assert isinstance(task, MultiTask) and task.weights == (1.0, 0.5) and task.main == "frame"
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)  # 2 classes + 1 value
    targets = torch.cat([torch.randint(0, 2, (2, 4, 1)).float(), torch.randn(2, 4, 1)], dim=-1)
    lens = torch.tensor([4, 3])
    frame = TASKS["frame"].loss(logits[..., :2], lens, targets[..., 0].long(), lens, time_stride=1)
    regress = TASKS["regress"].loss(logits[..., 2:], lens, targets[..., 1:], lens, time_stride=1)
    assert task.loss(logits, lens, targets, lens, time_stride=1).item() == pytest.approx((frame + 0.5 * regress).item())
    summed, frames = task.summed_loss(logits, lens, targets, lens, time_stride=1)
    assert frames == 7 and (summed / frames).item() == pytest.approx((frame + 0.5 * regress).item(), rel=1e-5)


@pytest.mark.parametrize("overrides, needle", [
    (["model.multitask=frame"], "at least two sub-tasks"),
    (["model.multitask=frame,ctc"], "unknown sub-task 'ctc'"),
    (["training.task_weights=1,x"], "expected comma-separated numbers"),
    (["training.task_weights=1"], "1 weights for the 2 sub-tasks"),
    (["training.task_weights=0,0"], "not all 0"),
    (["training.main_task=utt"], "must be one of model.multitask's sub-tasks"),
])
def test_bad_multitask_settings_are_one_line_config_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config((), ["model.task=multi", *overrides])


@pytest.mark.parametrize("task", ["regress", "multi"])
def test_the_memory_checks_synthetic_step_runs_for_the_new_tasks(task: str) -> None:
    config = load_config((), [f"model.task={task}", "model.recurrent_size=8", "model.convolutional_layers=1",
                              "model.convolutional_initial_channels=2"])
    sizes = dict(batch_size=2, max_frames=12, max_target_len=12)
    run_synthetic_step(config, 5, 3, device="cpu", **sizes)
    assert estimate_step(config, 5, 3, device="cpu", **sizes).bytes > 0


# --- bad data ------------------------------------------------------------------------------


def test_bad_regression_targets_are_one_line_errors_naming_file_and_line(tmp_path: Path) -> None:
    data = _regression_data(tmp_path / "d", 4, 0, form="text")
    (data / "utt2value").rename(data / "values.bak")
    with pytest.raises(DataError, match=r"targets\.scp is missing.*utt2value"):
        load_data_dir(data, task="regress")
    lines = (data / "values.bak").read_text().splitlines()
    utt, *values = lines[1].split()
    (data / "utt2value").write_text("\n".join([lines[0], " ".join([utt, *values[:-1]]), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"utt2value line 2: utterance '{utt}' has {len(values) - 1} target frames "
                                        rf"but {len(values)} frames"):
        load_data_dir(data, task="regress")
    (data / "utt2value").write_text("\n".join([lines[0], lines[1], lines[2].replace(" ", " abc ", 2), *lines[3:]]))
    with pytest.raises(DataError, match=r"utt2value line 3: .* non-numeric value 'abc'"):
        load_data_dir(data, task="regress")
    # targets.scp: a matrix of the wrong length, through the CLI (one line, no traceback)
    scp_dir = _regression_data(tmp_path / "e", 12, 1)
    ark = {u: m for u, m in kaldiio.load_scp(str(scp_dir / "targets.scp")).items()}
    first = sorted(ark)[0]
    ark[first] = ark[first][:-2]
    kaldiio.save_ark(str(scp_dir / "targets.ark"), ark, scp=str(scp_dir / "targets.scp"))
    line = sorted(ark).index(first) + 1
    done = cli([*SMALL, "--set", "model.task=regress", "train", scp_dir, tmp_path / "m", "--quiet"], tmp_path)
    assert_one_line_error(done, f"targets.scp line {line}: utterance {first!r} has", "target frames but")


# --- training, evaluate, optim through the CLI ------------------------------------------------


def test_regression_learns_a_target_that_needs_context_and_evaluate_prints_mse_and_ccc(tmp_path: Path) -> None:
    train, dev = _regression_data(tmp_path / "train", 120, 0), _regression_data(tmp_path / "dev", 16, 1)
    test = _regression_data(tmp_path / "test", 16, 2, form="text")
    done = cli([*SMALL, "--set", "model.task=regress", "--set", "training.num_epochs=15", "--set", "data.batch_size=8",
                "--set", "data.min_batches_per_epoch=1", "--set", "training.learning_rate=0.02",
                "train", train, dev, tmp_path / "m", "--quiet", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "m" / "history.csv").open()))
    assert {"dev_mse", "dev_ccc"} <= set(rows[0])
    for row in rows:  # the error driving training is 1 - CCC
        assert float(row["dev_error"]) == pytest.approx(1 - float(row["dev_ccc"]), abs=1e-5)
    evaluated = cli(["evaluate", tmp_path / "m" / "model.pt", test], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    words = evaluated.stdout.split()
    assert words[0] == "MSE" and words[2] == "CCC", evaluated.stdout
    assert float(words[3]) >= 0.9, evaluated.stdout
    as_json = json.loads(cli(["evaluate", tmp_path / "m" / "model.pt", test, "--json"], tmp_path).stdout)
    assert as_json["ccc"] == pytest.approx(float(words[3]), abs=1e-4) and as_json["rate"] == pytest.approx(1 - as_json["ccc"])
    assert_one_line_error(cli(["evaluate", tmp_path / "m" / "model.pt", test, "--out", tmp_path / "h.txt"], tmp_path),
                          "--out", "regress")
    two_dims = tmp_path / "two"
    _regression_data(two_dims, 4, 3)
    kaldiio.save_ark(str(two_dims / "targets.ark"),
                     {u: np.repeat(m, 2, axis=1) for u, m in kaldiio.load_scp(str(two_dims / "targets.scp")).items()},
                     scp=str(two_dims / "targets.scp"))
    assert_one_line_error(cli(["evaluate", tmp_path / "m" / "model.pt", two_dims], tmp_path),
                          "2 dimensions", "predicts 1")


def test_multitask_logs_every_task_and_the_main_task_selects_the_best_epoch(tmp_path: Path) -> None:
    train, dev = _regression_data(tmp_path / "train", 40, 0, labels=True), _regression_data(tmp_path / "dev", 10, 1, labels=True)
    done = cli([*SMALL, "--set", "model.task=multi", "--set", "training.task_weights=1.0,0.5",
                "--set", "training.main_task=regress", "--set", "training.num_epochs=4", "--set", "data.batch_size=8",
                "--set", "data.min_batches_per_epoch=1", "train", train, dev, tmp_path / "m", "--quiet"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "m" / "history.csv").open()))
    assert {"dev_frame_fer", "dev_regress_mse", "dev_regress_ccc"} <= set(rows[0])
    errors = [float(r["dev_error"]) for r in rows]
    assert errors == pytest.approx([1 - float(r["dev_regress_ccc"]) for r in rows], abs=1e-5)
    assert load_model_file(tmp_path / "m" / "model.pt").extra["best_epoch"] == 1 + int(np.argmin(errors))
    evaluated = cli(["evaluate", tmp_path / "m" / "model.pt", dev], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("FRAME_FER ") and "REGRESS_CCC" in evaluated.stdout, evaluated.stdout


@pytest.mark.parametrize("task", ["regress", "multi"])
def test_optim_init_run_and_best_for_the_new_tasks(tmp_path: Path, task: str) -> None:
    labels = task == "multi"
    train, dev = _regression_data(tmp_path / "train", 16, 0, labels=labels), _regression_data(tmp_path / "dev", 6, 1, labels=labels)
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    init = cli([*SMALL, "--set", f"model.task={task}", "--set", "training.num_epochs=2", "--set", "model.recurrent_size=8",
                "optim", "--study-name", task, url, "init", train, "--dev-dir", dev, "--num-trials", "2",
                "--whitelist", "training.learning_rate", "--mem-limit-bytes", str(2**34)], tmp_path)
    assert init.returncode == 0, init.stderr
    run = cli(["optim", "--study-name", task, url, "run", "--sampler", "random", "--seed", "0", "--quiet",
               "--ckpt-dir", tmp_path / "ckpt"], tmp_path)
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name=task, storage=url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and all(0.0 <= t.value <= 2.0 for t in complete)  # 1 - CCC lies in [0, 2]
    best = cli(["optim", "--study-name", task, url, "best", tmp_path / "best.ini", "--model", tmp_path / "best.pt",
                "--ckpt-dir", tmp_path / "ckpt"], tmp_path)
    assert best.returncode == 0, best.stderr
    assert f"task = {task}" in (tmp_path / "best.ini").read_text()
    evaluated = cli(["evaluate", tmp_path / "best.pt", dev, "--json"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert math.isfinite(json.loads(evaluated.stdout)["rate"])
