"""Frame regression (task ``regress``) and multitask (task ``multi``): CCC, reading targets,
training, ``evaluate`` and ``optim`` through the real CLI on real Kaldi dirs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

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
from stagetune.model import build_model
from stagetune.optim.estimate import estimate_step, run_synthetic_step
from stagetune.tasks import TASKS, MultiTask, RegressionTask, task_of
from stagetune.tasks.regression import subsample_values, target_stats

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


def _regression_data(path: Path, num_utts: int, seed: int, *, form: str = "scp", labels: bool = False,
                     scale: float = 1.0, offset: float = 0.0) -> Path:
    """Targets that need context: a moving average of feature 0 (plus its frame label for multitask),
    as ``offset + scale * value`` (value: std about 0.75)."""
    rng = np.random.default_rng(seed)
    feats, values, utt2label = {}, {}, {}
    for i in range(num_utts):
        utt = f"u{seed}-{i:03d}"
        mat = rng.normal(0.0, 1.0, size=(int(rng.integers(20, 40)), 5)).astype(np.float32)
        feats[utt] = mat
        values[utt] = (offset + scale * 2.0 * _windowed_mean(mat[:, 0])).astype(np.float32)[:, None]
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


#: Targets in large units: about 200 with std about 50 (F0 in Hz, say), the same values otherwise.
HZ = {"scale": 65.0, "offset": 200.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """Two regress runs of one config through the CLI, on the same targets in two units:
    ``unit`` (std about 0.75, around 0) and ``hz`` (:data:`HZ`); each with its train and test dirs."""
    root = tmp_path_factory.mktemp("regress")
    runs = {}
    for name, units in (("unit", {}), ("hz", HZ)):
        base = root / name
        train, dev = _regression_data(base / "train", 120, 0, **units), _regression_data(base / "dev", 16, 1, **units)
        test = _regression_data(base / "test", 16, 2, form="text", **units)
        done = cli([*SMALL, "--set", "model.task=regress", "--set", "training.num_epochs=15",
                    "--set", "data.batch_size=8", "--set", "data.min_batches_per_epoch=1",
                    "--set", "training.learning_rate=0.02",
                    "train", train, dev, base / "m", "--quiet", "--threads", "1"], root)
        assert done.returncode == 0, done.stderr
        runs[name] = SimpleNamespace(train=train, test=test, dir=base / "m", model=base / "m" / "model.pt")
    return runs


def _evaluate_json(model: Path, data: Path, cwd: Path, *args: object) -> dict[str, float]:
    done = cli(["evaluate", model, data, "--json", "--threads", "1", *args], cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _frame_values(data_dir: Path) -> np.ndarray:
    """Every target frame of a regress data dir, ``(frames, D)``."""
    data = load_data_dir(data_dir, task="regress")
    return np.concatenate([data.targets(u) for u in data.utt_ids])


def test_regression_learns_a_target_that_needs_context_and_evaluate_prints_mse_and_ccc(
    trained: dict[str, SimpleNamespace], tmp_path: Path
) -> None:
    run = trained["unit"]
    rows = list(csv.DictReader((run.dir / "history.csv").open()))
    assert {"dev_mse", "dev_ccc"} <= set(rows[0])
    for row in rows:  # the error driving training is 1 - CCC
        assert float(row["dev_error"]) == pytest.approx(1 - float(row["dev_ccc"]), abs=1e-5)
    test = run.test
    evaluated = cli(["evaluate", run.model, test], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    words = evaluated.stdout.split()
    assert words[0] == "MSE" and words[2] == "CCC", evaluated.stdout
    assert float(words[3]) >= 0.9, evaluated.stdout
    as_json = _evaluate_json(run.model, test, tmp_path)
    assert as_json["ccc"] == pytest.approx(float(words[3]), abs=1e-4) and as_json["rate"] == pytest.approx(1 - as_json["ccc"])
    two_dims = tmp_path / "two"
    _regression_data(two_dims, 4, 3)
    kaldiio.save_ark(str(two_dims / "targets.ark"),
                     {u: np.repeat(m, 2, axis=1) for u, m in kaldiio.load_scp(str(two_dims / "targets.scp")).items()},
                     scp=str(two_dims / "targets.scp"))
    assert_one_line_error(cli(["evaluate", run.model, two_dims], tmp_path), "2 dimensions", "predicts 1")


def test_targets_in_large_units_are_standardised_by_training_statistics_that_travel_in_model_pt(
    trained: dict[str, SimpleNamespace], tmp_path: Path
) -> None:
    # Trained on these raw values in Hz, the same run reached a CCC of 0.16 (MSE 2300, the targets'
    # variance being 2500); standardised, it learns them exactly as it learns the unit-scale copy.
    unit, hz = trained["unit"], trained["hz"]
    unit_figures, hz_figures = _evaluate_json(unit.model, unit.test, tmp_path), _evaluate_json(hz.model, hz.test, tmp_path)
    assert hz_figures["ccc"] >= 0.9, hz_figures
    assert hz_figures["ccc"] == pytest.approx(unit_figures["ccc"], abs=0.02)
    # MSE in the targets' own units: Hz squared, the unit-scale model's times the scale squared
    assert hz_figures["mse"] == pytest.approx(HZ["scale"] ** 2 * unit_figures["mse"], rel=0.1)
    assert hz_figures["mse"] < 0.2 * _frame_values(hz.test).var()
    # The statistics are those of the training targets, in model.pt ...
    values = _frame_values(hz.train)
    state = load_model_file(hz.model).state_dict
    assert state["output.target_mean"].numpy() == pytest.approx(values.mean(axis=0), rel=1e-5)
    assert state["output.target_std"].numpy() == pytest.approx(values.std(axis=0), rel=1e-4)
    assert 150 < float(state["output.target_mean"][0]) < 250 and 30 < float(state["output.target_std"][0]) < 70
    # ... so a copy of model.pt alone elsewhere evaluates the same, data dir included or not
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(hz.model, alone)
    assert _evaluate_json(alone, hz.test, tmp_path) == hz_figures


def test_a_model_file_without_target_statistics_loads_as_mean_0_and_std_1(
    trained: dict[str, SimpleNamespace], tmp_path: Path
) -> None:
    hz = trained["hz"]
    stored = torch.load(hz.model, map_location="cpu", weights_only=False)
    old = dict(stored, state_dict={k: v for k, v in stored["state_dict"].items() if not k.startswith("output.target_")})
    torch.save(old, tmp_path / "old.pt")
    identity = dict(stored["state_dict"])
    identity["output.target_mean"] = torch.zeros(1)
    identity["output.target_std"] = torch.ones(1)
    torch.save(dict(stored, state_dict=identity), tmp_path / "identity.pt")
    figures = _evaluate_json(tmp_path / "old.pt", hz.test, tmp_path)
    assert figures == _evaluate_json(tmp_path / "identity.pt", hz.test, tmp_path)
    assert figures["mse"] > 10 * _evaluate_json(hz.model, hz.test, tmp_path)["mse"]  # raw z, not Hz


def test_evaluate_out_writes_each_utterances_predictions_in_the_targets_units(
    trained: dict[str, SimpleNamespace], tmp_path: Path
) -> None:
    hz = trained["hz"]
    out = tmp_path / "new" / "pred.ark"  # its directory is made
    figures = _evaluate_json(hz.model, hz.test, tmp_path, "--out", out)
    written = kaldiio.load_ark(str(out))
    predictions = {utt: np.array(matrix) for utt, matrix in written}
    data = load_data_dir(hz.test, task="regress")
    assert sorted(predictions) == data.utt_ids
    mf = load_model_file(hz.model)
    model = build_model(mf.config, mf.feat_dim, 1)
    refs, preds = [], []
    for utt in data.utt_ids:
        frames = int(model.output_lengths(torch.tensor([data.num_frames[utt]]))[0])
        assert predictions[utt].shape == (frames, 1) and predictions[utt].dtype == np.float32
        target = torch.from_numpy(data.targets(utt))[None]
        sub, _ = subsample_values(target, torch.tensor([len(target[0])]), model.time_stride,
                                  out_lens=torch.tensor([frames]), num_frames=frames)
        refs.append(sub[0].numpy())
        preds.append(predictions[utt])
    refs_all, preds_all = np.concatenate(refs), np.concatenate(preds)
    # the values the figures were computed from, in Hz
    assert float(((preds_all - refs_all) ** 2).mean()) == pytest.approx(figures["mse"], rel=1e-4)
    assert abs(preds_all.mean() - refs_all.mean()) < 0.2 * refs_all.std()
    assert concordance_correlation(preds_all[:, 0], refs_all[:, 0]) == pytest.approx(figures["ccc"], abs=1e-4)
    # a path that cannot be written: one line, nothing left behind
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = cli(["evaluate", hz.model, hz.test, "--out", blocker / "pred.ark"], tmp_path)
    assert_one_line_error(done, "cannot write", str(blocker / "pred.ark"))
    assert_one_line_error(cli(["evaluate", hz.model, hz.test, "--out", tmp_path], tmp_path), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "new"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["pred.ark"]


def test_a_constant_target_dimension_gets_std_1_and_trains_without_nan(tmp_path: Path) -> None:
    mean, std, frames = target_stats([np.array([[7.0, 1.0], [7.0, 3.0]]), np.zeros((0, 2)), np.array([[7.0, 2.0]])], 2)
    assert frames == 3 and mean.tolist() == pytest.approx([7.0, 2.0]) and std.tolist() == pytest.approx([1.0, np.sqrt(2 / 3)])
    assert target_stats([], 1)[1].tolist() == [1.0]  # no frames at all: nothing to divide by either
    # through the CLI: multitask (frame driving) with a varying and a constant value per frame
    dirs = []
    for name, seed in (("train", 0), ("dev", 1)):
        directory = _regression_data(tmp_path / name, 16 if name == "train" else 6, seed, labels=True)
        values = {u: np.concatenate([m, np.full_like(m, 7.0)], axis=1)
                  for u, m in kaldiio.load_scp(str(directory / "targets.scp")).items()}
        kaldiio.save_ark(str(directory / "targets.ark"), values, scp=str(directory / "targets.scp"))
        dirs.append(directory)
    done = cli([*SMALL, "--set", "model.task=multi", "--set", "training.num_epochs=2", "--set", "data.batch_size=8",
                "--set", "model.recurrent_size=8", "train", *dirs, tmp_path / "m", "--quiet", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    for row in csv.DictReader((tmp_path / "m" / "history.csv").open()):
        assert all(math.isfinite(float(row[key])) for key in ("train_loss", "dev_loss", "dev_regress_mse"))
    state = load_model_file(tmp_path / "m" / "model.pt").state_dict
    # classes 0 and 1 as they are, then the two values: the constant one by std 1
    assert state["output.target_std"].tolist()[-1] == 1.0 and state["output.target_mean"].tolist()[-1] == 7.0
    assert state["output.target_mean"].tolist()[:2] == [0.0, 0.0] and state["output.target_std"].tolist()[:2] == [1.0, 1.0]
    # --out of a multitask model driven by frame: the frame task's hypotheses, one label per output frame
    figures = _evaluate_json(tmp_path / "m" / "model.pt", dirs[1], tmp_path, "--out", tmp_path / "hyp.txt")
    assert all(math.isfinite(figures[key]) for key in ("rate", "frame_fer", "regress_mse", "regress_ccc")), figures
    lines = (tmp_path / "hyp.txt").read_text().splitlines()
    data = load_data_dir(dirs[1], task="multi")
    assert [line.split()[0] for line in lines] == data.utt_ids
    assert all(set(line.split()[1:]) <= {"0", "1"} and len(line.split()) > 1 for line in lines)


def test_an_adapted_model_keeps_the_base_models_target_statistics(
    trained: dict[str, SimpleNamespace], tmp_path: Path
) -> None:
    hz = trained["hz"]
    other = _regression_data(tmp_path / "other", 12, 5, scale=30.0, offset=100.0)  # other units, other statistics
    done = cli([*SMALL, "--set", "model.task=regress", "--set", "training.num_epochs=1", "--set", "data.batch_size=8",
                "--set", "training.adapt_rho=0.5", "train", other, other, tmp_path / "adapted",
                "--adapt-from", hz.model, "--quiet", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    base, adapted = load_model_file(hz.model).state_dict, load_model_file(tmp_path / "adapted" / "model.pt").state_dict
    for key in ("output.target_mean", "output.target_std"):
        assert torch.equal(base[key], adapted[key])
    assert math.isfinite(_evaluate_json(tmp_path / "adapted" / "model.pt", other, tmp_path)["mse"])
    # --init-from only initialises: the statistics are this run's own
    done = cli([*SMALL, "--set", "model.task=regress", "--set", "training.num_epochs=1", "--set", "data.batch_size=8",
                "train", other, other, tmp_path / "init", "--init-from", hz.model, "--quiet", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    fresh = load_model_file(tmp_path / "init" / "model.pt").state_dict
    assert fresh["output.target_mean"].numpy() == pytest.approx(_frame_values(other).mean(axis=0), rel=1e-5)


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
    evaluated = cli(["evaluate", tmp_path / "m" / "model.pt", dev, "--out", tmp_path / "pred.ark"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("FRAME_FER ") and "REGRESS_CCC" in evaluated.stdout, evaluated.stdout
    # --out of a model driven by regress: its values per output frame, as a regress model writes them
    predictions = {utt: np.array(m) for utt, m in kaldiio.load_ark(str(tmp_path / "pred.ark"))}
    data = load_data_dir(dev, task="multi")
    assert sorted(predictions) == data.utt_ids and all(m.ndim == 2 and m.shape[1] == 1 for m in predictions.values())
    # the value output is standardised by the training targets (classes 0 and 1 as they are)
    train_data = load_data_dir(train, task="multi")
    train_values = np.concatenate([train_data.targets(u)[:, 1:] for u in train_data.utt_ids])
    state = load_model_file(tmp_path / "m" / "model.pt").state_dict
    assert state["output.target_mean"].tolist() == pytest.approx([0.0, 0.0, float(train_values.mean())], abs=1e-5)
    assert state["output.target_std"].tolist() == pytest.approx([1.0, 1.0, float(train_values.std())], rel=1e-4)


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
