"""Training (``stagetune.training``): exact resumption, reruns, config checks, stopping.

The signal tests drive the real ``stagetune train`` in a subprocess, interrupt it
mid-epoch (SIGTERM, or SIGKILL with no chance to save anything) and rerun the
same command; the final weights must equal those of an uninterrupted run.  The
reference run is an in-process :func:`fit` of the same config on the same data,
so the tests also pin CLI and library to the same result.  Augmentation (time
and frequency masks, noise) and dropout are on throughout, so their randomness
must be reproducible too.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import write_data_dir
from stagetune import __version__
from stagetune.checkpoint import atomic_save, data_identity, load_checkpoint, load_model_file
from stagetune.cli import main
from stagetune.config import Config, load_config, write_ini
from stagetune.corpus import Corpus, load_corpus
from stagetune.training import FitResult, NonFiniteLoss, fit

torch.set_num_threads(1)

TOKENS = ("A", "B", "C", "D", "E")
#: A small conv + GRU model that learns the token data below in a few epochs,
#: with every source of training randomness on.
SETTINGS = (
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=32",
    "training.num_epochs=3",
    "training.learning_rate=0.01",
    "training.num_time_mask=1",
    "training.max_time_mask=4",
    "training.num_freq_mask=1",
    "training.max_freq_mask=2",
    "training.noise_eps=0.1",
    "training.dropout_prob=0.2",
    "data.batch_size=2",
)
#: history.csv columns that do not depend on wall-clock time.
EXACT_COLUMNS = ("epoch", "train_loss", "dev_error", "dev_loss", "learning_rate", "padding_fraction")
STAGETUNE = Path(sys.executable).with_name("stagetune")


def write_token_data(path: Path, num_utts: int, *, seed: int = 0, feat_dim: int = 8) -> Path:
    """A Kaldi CTC data dir where each token is a few frames of its own feature pattern.

    Tokens are separated by short noise-only gaps, so a small model learns them
    in a couple of epochs (dev TER near 0), unlike random features.
    """
    rng = np.random.default_rng(seed)
    feats, text, utt2spk = {}, {}, {}
    for i in range(num_utts):
        spk = f"spk{i % 3}"
        utt = f"{spk}-u{i:03d}"
        ids = rng.integers(0, len(TOKENS), size=int(rng.integers(1, 5)))
        frames = [rng.normal(0.0, 0.3, (int(rng.integers(1, 4)), feat_dim))]
        for t in ids:
            pattern = np.full(feat_dim, -1.0)
            pattern[[t, t + 3]] = 2.0
            frames.append(pattern + rng.normal(0.0, 0.3, (int(rng.integers(3, 7)), feat_dim)))
            frames.append(rng.normal(0.0, 0.3, (int(rng.integers(1, 4)), feat_dim)))
        feats[utt] = np.concatenate(frames).astype(np.float32)
        text[utt] = [TOKENS[t] for t in ids]
        utt2spk[utt] = spk
    return write_data_dir(path, feats, text, tokens=TOKENS, utt2spk=utt2spk, cmvn=True)


def make_config(*extra: str) -> Config:
    return load_config([], [*SETTINGS, *extra])


def set_args(*extra: str) -> list[str]:
    return [arg for setting in (*SETTINGS, *extra) for arg in ("--set", setting)]


def read_history(model_dir: Path) -> list[dict[str, str]]:
    with (model_dir / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def exact_history(model_dir: Path) -> list[tuple[str, ...]]:
    return [tuple(row[c] for c in EXACT_COLUMNS) for row in read_history(model_dir)]


def final_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(model_dir / "checkpoint.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def fit_quiet(config: Config, corpus: Corpus, model_dir: Path, **kwargs) -> tuple[FitResult, list[str]]:
    """``fit`` on cpu, returning its result and log lines."""
    lines: list[str] = []
    result = fit(config, corpus, model_dir, device="cpu", quiet=True, log=lines.append, **kwargs)
    return result, lines


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The CLI's ``main`` in this process, on cpu: ``(exit code, stderr)``."""
    capsys.readouterr()
    code = main(["--device", "cpu", *argv])
    return code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("stagetune: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 160 utterances: ~70 batches of 2 per epoch, long enough to interrupt mid-epoch.
    return write_token_data(tmp_path_factory.mktemp("data") / "train", 160)


@pytest.fixture(scope="module")
def corpus(data_dir: Path) -> Corpus:
    return load_corpus(data_dir, task="ctc")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> Path:
    """An uninterrupted 3-epoch run; do not modify."""
    model_dir = tmp_path_factory.mktemp("reference") / "model"
    fit_quiet(make_config(), corpus, model_dir)
    return model_dir


# -- resumption through the real CLI --------------------------------------------------


class Training:
    """``stagetune train`` in a subprocess, its progress bars read as they come."""

    def __init__(self, data_dir: Path, model_dir: Path) -> None:
        self.command = [
            str(STAGETUNE), "--device", "cpu", *set_args(), "train", "--threads", "1",
            str(data_dir), str(model_dir),
        ]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._stderr += chunk

    @property
    def stderr(self) -> str:
        return bytes(self._stderr).decode("utf-8", errors="replace")

    def batches_done(self, epoch: int) -> int:
        """The last batch count tqdm showed for ``epoch`` ("epoch 2/3:  40%|...| 29/72 [...")."""
        shown = re.findall(rf"epoch {epoch}/\d+:[^\r\n]*?\| *(\d+)/\d+ ", self.stderr)
        return int(shown[-1]) if shown else 0

    def wait_into_epoch(self, epoch: int, batches: int = 2) -> None:
        """Return once ``batches`` batches of ``epoch`` are done (the epoch has ~70)."""
        deadline = time.monotonic() + 300
        while self.batches_done(epoch) < batches:
            assert self.proc.poll() is None, f"training ended early:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no progress in epoch {epoch}:\n{self.stderr}"
            time.sleep(0.005)

    def finish(self) -> int:
        self.proc.wait(timeout=300)
        self._reader.join(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


def _rerun_and_compare(training: Training, model_dir: Path, reference: Path) -> str:
    """Rerun the same command, check it ends where ``reference`` did; return its stderr."""
    epoch_1 = read_history(model_dir)[0]
    rerun = subprocess.run(training.command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    # Epoch 1 was not trained again: its row (wall-clock columns included) is kept.
    assert read_history(model_dir)[0] == epoch_1
    assert exact_history(model_dir) == exact_history(reference)
    assert_same_weights(final_weights(model_dir), final_weights(reference))
    assert_same_weights(
        load_model_file(model_dir / "model.pt").state_dict,
        load_model_file(reference / "model.pt").state_dict,
    )
    return rerun.stderr


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_rerun_matches_uninterrupted(
    tmp_path: Path, data_dir: Path, reference: Path
) -> None:
    model_dir = tmp_path / "model"
    training = Training(data_dir, model_dir)
    training.wait_into_epoch(2)
    training.proc.send_signal(signal.SIGTERM)

    assert training.finish() == 128 + signal.SIGTERM
    stderr = training.stderr
    assert "Traceback" not in stderr
    # Progress bars are \r-separated; the message is the one error line, and the last.
    pieces = [p.strip() for p in re.split(r"[\r\n]+", stderr) if p.strip()]
    errors = [p for p in pieces if p.startswith("stagetune: error:")]
    assert errors == pieces[-1:], stderr
    state = load_checkpoint(model_dir / "checkpoint.pt")["state"]
    assert state["epoch"] == 1 and state["batch"] >= 2, "the checkpoint is not mid-epoch"
    assert re.fullmatch(
        rf"stagetune: error: SIGTERM received: checkpoint saved in {re.escape(str(model_dir))} "
        rf"at epoch 2, batch {state['batch']}/\d+; rerun the same command to resume",
        errors[0],
    ), errors[0]

    rerun_stderr = _rerun_and_compare(training, model_dir, reference)
    assert f"resuming {model_dir} at epoch 2, batch {state['batch'] + 1}\n" in rerun_stderr


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_matches_uninterrupted(
    tmp_path: Path, data_dir: Path, reference: Path
) -> None:
    model_dir = tmp_path / "model"
    training = Training(data_dir, model_dir)
    training.wait_into_epoch(2)
    training.proc.kill()

    assert training.finish() == -signal.SIGKILL
    # Killed inside epoch 2 with no chance to save: only epoch 1 is on disk.
    assert load_checkpoint(model_dir / "checkpoint.pt")["state"]["epoch"] == 1
    assert len(read_history(model_dir)) == 1
    assert not (model_dir / "model.pt").exists()
    rerun_stderr = _rerun_and_compare(training, model_dir, reference)
    assert f"resuming {model_dir} at epoch 2\n" in rerun_stderr


# -- resumption, reruns and config checks in-process ------------------------------------


def test_history_has_one_row_per_epoch(reference: Path) -> None:
    rows = read_history(reference)
    assert list(rows[0]) == [
        "epoch", "train_loss", "dev_error", "dev_loss", "learning_rate", "seconds",
        "frames_per_second", "padding_fraction",
    ]
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    losses = [float(row["train_loss"]) for row in rows]
    assert losses[-1] < losses[0], "the reference run did not learn"
    assert float(rows[-1]["dev_error"]) < 0.5
    dev_losses = [float(row["dev_loss"]) for row in rows]
    assert all(np.isfinite(dev_losses)) and min(dev_losses) > 0
    assert dev_losses[-1] < dev_losses[0], "the dev loss does not follow the learning"


def test_model_file_carries_config_dims_and_tokens(reference: Path, corpus: Corpus) -> None:
    model_file = load_model_file(reference / "model.pt")
    assert model_file.config == make_config()
    assert model_file.feat_dim == 8
    assert model_file.tokens == ["<blank>", *TOKENS]
    best = torch.load(reference / "best.pt", weights_only=True)
    assert_same_weights(model_file.state_dict, best)
    assert (reference / "config.ini").read_text() == write_ini(make_config())


def test_rerun_of_finished_training_is_a_noop(tmp_path: Path, reference: Path, corpus: Corpus) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(reference, model_dir)
    checkpoint = (model_dir / "checkpoint.pt").read_bytes()
    history = (model_dir / "history.csv").read_text()
    result, log = fit_quiet(make_config(), corpus, model_dir)
    assert log == [f"{model_dir}: already trained (3 epochs); nothing to do"]
    assert (model_dir / "checkpoint.pt").read_bytes() == checkpoint
    assert (model_dir / "history.csv").read_text() == history
    assert (result.epochs_run, result.resumed_from_epoch) == (3, 3)
    assert_same_weights(
        load_model_file(model_dir / "model.pt").state_dict,
        load_model_file(reference / "model.pt").state_dict,
    )


def test_more_epochs_continue_from_the_checkpoint(
    tmp_path: Path, reference: Path, corpus: Corpus
) -> None:
    model_dir = tmp_path / "model"
    first, _ = fit_quiet(make_config("training.num_epochs=2"), corpus, model_dir)
    assert first.epochs_run == 2
    second, log = fit_quiet(make_config(), corpus, model_dir)
    assert log[0] == f"resuming {model_dir} at epoch 3"
    assert (second.epochs_run, second.resumed_from_epoch) == (3, 2)
    # 2 + 1 epochs end exactly where 3 epochs in one go do.
    assert exact_history(model_dir) == exact_history(reference)
    assert_same_weights(final_weights(model_dir), final_weights(reference))


def test_data_workers_give_the_same_weights(tmp_path: Path, reference: Path, corpus: Corpus) -> None:
    model_dir = tmp_path / "model"
    fit_quiet(make_config(), corpus, model_dir, num_workers=2)
    assert exact_history(model_dir) == exact_history(reference)
    assert_same_weights(final_weights(model_dir), final_weights(reference))


def test_resuming_with_another_config_names_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_dir: Path, reference: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(reference, model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    code, stderr = run_main(
        capsys,
        *set_args("training.learning_rate=0.02", "model.recurrent_size=16"),
        "train", "--threads", "1", "--quiet", str(data_dir), str(model_dir),
    )
    assert code == 2
    message = one_error_line(stderr)
    assert "training.learning_rate: 0.01 -> 0.02" in message
    assert "model.recurrent_size: 32 -> 16" in message
    assert "use a new model directory" in message
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_resuming_on_other_data_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(reference, model_dir)
    other = write_token_data(tmp_path / "wide", 40, feat_dim=10)
    code, stderr = run_main(
        capsys, *set_args(), "train", "--threads", "1", "--quiet", str(other), str(model_dir)
    )
    assert code == 2
    message = one_error_line(stderr)
    assert "feature dimension 8" in message and "10" in message


def test_resuming_on_other_utterances_names_both_counts_and_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_dir: Path, reference: Path
) -> None:
    """Same feature dimension and tokens, other utterances: refused, not silently continued."""
    model_dir = tmp_path / "model"
    shutil.copytree(reference, model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    other = write_token_data(tmp_path / "other", 24, seed=1)
    code, stderr = run_main(
        capsys, *set_args(), "train", "--threads", "1", "--quiet", str(other), str(model_dir)
    )
    assert code == 2
    ckpt = model_dir / "checkpoint.pt"
    old = load_checkpoint(ckpt)["data"]["train"]
    new = data_identity(load_corpus(other))["train"]
    assert (old["dir"], new["utterances"]) == (str(data_dir), 19)  # the dev split holds 5 of 24
    assert one_error_line(stderr) == (
        f"stagetune: error: checkpoint {ckpt} was trained on {old['utterances']} utterances of "
        f"{data_dir} (hash {old['hash'][:8]}), this data has 19 of {other} (hash {new['hash'][:8]}); "
        f"use a new model directory (or remove {ckpt}) to start over, or the same data to resume"
    )
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_a_checkpoint_that_records_no_data_resumes_with_one_warning(tmp_path: Path) -> None:
    """Checkpoints written before the data identity existed still resume (format unchanged)."""
    corpus = load_corpus(write_token_data(tmp_path / "data", 24))
    model_dir = tmp_path / "model"
    fit_quiet(make_config("training.num_epochs=1"), corpus, model_dir)
    ckpt = model_dir / "checkpoint.pt"
    older = load_checkpoint(ckpt)
    del older["data"], older["owner"]
    atomic_save(older, ckpt)
    result, log = fit_quiet(make_config("training.num_epochs=2"), corpus, model_dir)
    assert log[:2] == [
        f"stagetune: warning: checkpoint {ckpt} (written by stagetune {__version__}) does not record "
        f"its training data; resuming without checking that this is the same data",
        f"resuming {model_dir} at epoch 2",
    ]
    assert result.epochs_run == 2
    assert load_checkpoint(ckpt)["data"] == data_identity(corpus)  # recorded from now on


def test_a_truncated_checkpoint_resumes_from_the_previous_one_to_the_same_weights(tmp_path: Path) -> None:
    """A checkpoint cut short (full disk, crash) costs an epoch, not the run: the same end."""
    corpus = load_corpus(write_token_data(tmp_path / "data", 24))
    straight, _ = fit_quiet(make_config("training.num_epochs=3"), corpus, tmp_path / "straight")
    model_dir = tmp_path / "model"
    fit_quiet(make_config("training.num_epochs=2"), corpus, model_dir)
    ckpt = model_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    result, log = fit_quiet(make_config("training.num_epochs=3"), corpus, model_dir)
    assert log[0].startswith(f"stagetune: warning: {ckpt}: cannot read checkpoint")
    assert log[0].endswith("resuming from the previous checkpoint checkpoint.pt.prev (epoch 1)")
    assert log[1] == f"resuming {model_dir} at epoch 2"
    assert result.epochs_run == 3
    ours = torch.load(model_dir / "model.pt", weights_only=False)["state_dict"]
    theirs = torch.load(tmp_path / "straight" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _write_ctc(path: Path, texts: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(len(texts))
    feats = {u: rng.normal(size=(20, 8)).astype(np.float32) for u in texts}
    return write_data_dir(path, feats, texts, tokens=TOKENS)


def test_training_on_empty_transcripts_only_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _write_ctc(tmp_path / "train", {f"t{i}": [] for i in range(6)})
    dev = _write_ctc(tmp_path / "dev", {"d0": ["A"], "d1": ["B", "C"]})
    model_dir = tmp_path / "model"
    code, stderr = run_main(
        capsys, *set_args("training.num_epochs=1"), "train", "--threads", "1", "--quiet",
        str(train), str(dev), str(model_dir),
    )
    assert code == 1
    assert one_error_line(stderr) == (
        f"stagetune: error: {train}: all 6 training transcripts are empty, so there is nothing to "
        f"learn; give training data with transcribed utterances"
    )
    assert not model_dir.exists()


def test_dev_tokens_training_never_shows_are_one_warning_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _write_ctc(tmp_path / "train", {f"t{i}": ["A", "B", "C"][: 1 + i % 3] for i in range(6)})
    dev = _write_ctc(tmp_path / "dev", {"d0": ["A", "E"], "d1": ["D", "B"]})
    code, stderr = run_main(
        capsys, *set_args("training.num_epochs=1"), "train", "--threads", "1", "--quiet",
        str(train), str(dev), str(tmp_path / "model"),
    )
    assert code == 0, stderr
    assert stderr.splitlines() == [
        "stagetune: warning: 2 dev tokens never occur in the training transcripts ('D', 'E'); the "
        "model cannot learn them, so they count as errors"
    ]


def test_frame_dev_labels_beyond_the_training_classes_are_an_error_and_unseen_ones_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)

    def write(name: str, labels: list[int]) -> Path:
        feats = {f"{name}{i}": rng.normal(size=(12, 8)).astype(np.float32) for i in range(4)}
        return write_data_dir(
            tmp_path / name, feats, utt2label={u: [labels[i % len(labels)] for i in range(12)] for u in feats}
        )

    train = write("train", [0, 1, 3])  # classes 0..3; 2 never seen
    run = [*set_args("model.task=frame", "training.num_epochs=1"), "train", "--threads", "1", "--quiet"]
    code, stderr = run_main(capsys, *run, str(train), str(write("beyond", [0, 2, 5])), str(tmp_path / "m1"))
    assert code == 1
    assert one_error_line(stderr) == (
        f"stagetune: error: {tmp_path / 'beyond'}: 1 dev labels (5) are beyond the 4 classes 0..3 "
        f"of the training labels; train on data with every class"
    )
    code, stderr = run_main(capsys, *run, str(train), str(write("unseen", [0, 2])), str(tmp_path / "m2"))
    assert code == 0, stderr
    assert stderr.splitlines() == [
        "stagetune: warning: 1 dev label never occurs in the training labels (2); the model cannot "
        "learn it, so it counts as errors"
    ]


def test_init_from_copies_matching_weights(tmp_path: Path, reference: Path, corpus: Corpus) -> None:
    source = load_model_file(reference / "model.pt").state_dict
    model_dir = tmp_path / "model"
    # Another recurrent size: the conv layer matches, the GRU and output do not.
    # A learning rate of 1e-12 leaves the copied weights as they were.
    _, log = fit_quiet(
        make_config("model.recurrent_size=48", "training.learning_rate=1e-12", "training.num_epochs=1"),
        corpus,
        model_dir,
        init_from=reference / "model.pt",
    )
    # convs.0.weight, convs.0.bias and output.bias (6 tokens) match; the rest does not.
    assert log[0] == f"initialised 3 tensors from {reference / 'model.pt'} (9 kept fresh)"
    weights = final_weights(model_dir)
    for name in ("convs.0.weight", "convs.0.bias", "output.bias"):
        assert torch.allclose(weights[name], source[name], rtol=0, atol=1e-9), name
    assert weights["output.weight"].shape != source["output.weight"].shape


def test_init_from_model_without_matching_params_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_dir: Path, tiny_frame_data_dir: Path
) -> None:
    frame_dir = tmp_path / "frame"
    fit_quiet(
        load_config([], ["model.task=frame", "model.convolutional_layers=0", "model.recurrent_layers=0",
                         "training.num_epochs=1"]),
        load_corpus(tiny_frame_data_dir, task="frame"),
        frame_dir,
    )
    model_dir = tmp_path / "model"
    code, stderr = run_main(
        capsys, *set_args(), "train", "--threads", "1", "--quiet",
        "--init-from", str(frame_dir / "model.pt"), str(data_dir), str(model_dir),
    )
    assert code == 2
    assert "no parameter matches this model's names and shapes" in one_error_line(stderr)
    assert not model_dir.exists()


# -- stopping ------------------------------------------------------------------------------


def test_early_stopping_stops_a_model_that_cannot_improve(tmp_path: Path, corpus: Corpus) -> None:
    config = make_config(
        "training.learning_rate=1e-12",
        "training.num_epochs=6",
        "training.early_stopping_threshold=0.01",
        "training.early_stopping_patience=1",
    )
    result, log = fit_quiet(config, corpus, tmp_path / "model")
    assert result.stopped_early
    assert result.epochs_run == 2
    assert len(read_history(tmp_path / "model")) == 2
    assert log[-1] == "early stopping after epoch 2: no improvement for 1 epochs"
    # A rerun does not train on: the stop is part of the checkpoint.
    again, log = fit_quiet(config, corpus, tmp_path / "model")
    assert again.epochs_run == 2 and "already trained" in log[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_huge_learning_rate_trains_or_stops_with_non_finite_loss(
    tmp_path: Path, corpus: Corpus, seed: int
) -> None:
    config = make_config(
        "training.optimizer=sgd", "training.learning_rate=10", "training.clip_grad_norm=0",
        "training.num_epochs=1", f"training.seed={seed}",
    )
    try:
        result, _ = fit_quiet(config, corpus, tmp_path / "model")
    except NonFiniteLoss as exc:
        assert "lower training.learning_rate" in str(exc)
    else:
        assert all(np.isfinite(float(row["train_loss"])) for row in result.history)


def test_diverging_training_is_a_one_line_error_and_saves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    # SGD weight decay 1 at learning rate 10 multiplies every weight by -9 per
    # step: the weights overflow within an epoch whatever the data.
    model_dir = tmp_path / "model"
    code, stderr = run_main(
        capsys,
        *set_args(
            "training.optimizer=sgd", "training.learning_rate=10", "training.clip_grad_norm=0",
            "training.weight_decay=1", "training.momentum=0", "training.num_epochs=2",
        ),
        "train", "--threads", "1", "--quiet", str(data_dir), str(model_dir),
    )
    assert code == 1
    message = one_error_line(stderr)
    assert message == (
        "stagetune: error: training loss became nan in epoch 1; lower "
        "training.learning_rate or set training.clip_grad_norm"
    )
    assert not (model_dir / "checkpoint.pt").exists()
    assert not (model_dir / "model.pt").exists()


# -- dev loss and CTC feasibility ---------------------------------------------------------


@pytest.mark.parametrize("task_name", ["ctc", "frame"])
def test_dev_loss_is_per_unit_whatever_the_batching(task_name: str) -> None:
    from stagetune.dataset import collate
    from stagetune.model import build_model
    from stagetune.tasks import TASKS
    from stagetune.training import validate

    torch.manual_seed(0)
    model = build_model(make_config(f"model.task={task_name}"), 8, 4)
    gen = torch.Generator().manual_seed(1)
    items = []
    for i, frames in enumerate((9, 30, 24, 21, 16)):
        feats = torch.randn(frames, 8, generator=gen)
        if task_name == "ctc":
            targets = torch.randint(1, 4, (1 + i % 3 * 2,), generator=gen)  # 1, 3 or 5 tokens
        else:
            targets = torch.randint(0, 4, (frames,), generator=gen)
        items.append((feats, targets, f"u{i}"))
    padded = [collate(items[:3]), collate(items[3:])]
    alone = [collate([item]) for item in items]
    counts, dev_loss = validate(model, padded, TASKS[task_name], torch.device("cpu"))
    alone_counts, alone_loss = validate(model, alone, TASKS[task_name], torch.device("cpu"))
    assert counts == alone_counts
    assert dev_loss == pytest.approx(alone_loss, rel=1e-5)
    assert not model.training  # dropout off: validation is deterministic
    assert validate(model, padded, TASKS[task_name], torch.device("cpu"))[1] == dev_loss
    if task_name == "ctc":
        # CTC summed over utterances over the number of target tokens; not the batch
        # mean of per-utterance means that training's loss uses.
        with torch.no_grad():
            losses = []
            for feats, targets, _ in items:
                logits, out_lens = model(feats[None], torch.tensor([len(feats)]))
                losses.append(float(torch.nn.functional.ctc_loss(
                    logits.log_softmax(-1).transpose(0, 1), targets[None], out_lens,
                    torch.tensor([len(targets)]), reduction="sum",
                )))
        tokens = [len(t) for _, t, _ in items]
        assert dev_loss == pytest.approx(sum(losses) / sum(tokens), rel=1e-5)
        assert dev_loss != pytest.approx(np.mean([l / n for l, n in zip(losses, tokens)]), rel=1e-3)
        needed = TASKS["ctc"].frames_needed([t for _, t, _ in items])
        assert (model.output_lengths(np.array([len(f) for f, _, _ in items])) >= needed).all()


def _feasibility_data(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)

    def feats(frames: int) -> np.ndarray:
        return rng.normal(size=(frames, 8)).astype(np.float32)

    # With one conv layer of stride 2, T frames give ceil(T / 2) output frames.
    train_text = {"long-1": ["A", "B"], "long-2": ["C", "A", "B"], "long-3": ["D"], "short": ["A", "A", "B"]}
    train_frames = {"long-1": 20, "long-2": 24, "long-3": 12, "short": 5}  # short: 3 < 3 + 1 repeat
    dev_text = {"dev-1": ["B", "C"], "dev-rep": ["D", "D"]}
    dev_frames = {"dev-1": 16, "dev-rep": 4}  # dev-rep: 2 < 2 + 1 repeat
    return tuple(
        write_data_dir(root / name, {u: feats(n) for u, n in frames.items()}, text, tokens=TOKENS)
        for name, frames, text in (("train", train_frames, train_text), ("dev", dev_frames, dev_text))
    )


def test_a_stride_too_large_for_ctc_is_one_error_line_before_anything_is_written(tmp_path: Path) -> None:
    train, dev = _feasibility_data(tmp_path)
    model_dir = tmp_path / "model"
    command = [str(STAGETUNE), "--device", "cpu", *set_args("training.num_epochs=1"), "train",
               "--threads", "1", "--quiet", str(train), str(dev), str(model_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert one_error_line(done.stderr) == (
        "stagetune: error: a total time stride of 2 leaves 1 of 4 train and 1 of 2 dev utterances "
        "fewer output frames than CTC needs (e.g. 'short' in train: 5 frames -> 3 output frames, "
        "needs 4 = 3 tokens + 1 adjacent repeat); subsample time less: lower "
        "model.convolutional_time_factor, raise model.convolutional_factor_sched or use fewer "
        "model.convolutional_layers"
    )
    assert not model_dir.exists()
    # The fix the message names trains.
    fixed = [*command[:3], "--set", "model.convolutional_time_factor=1", *command[3:]]
    done = subprocess.run(fixed, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (model_dir / "model.pt").exists()


def test_mixed_precision_skips_an_overflowing_batch_and_only_an_all_overflow_epoch_is_non_finite() -> None:
    """Under a gradient scaler a batch whose loss is inf/NaN is skipped (as the scaler skips its
    step): the trial is not pruned for it. Every batch overflowing is still non-finite."""
    from stagetune.dataset import Batch
    from stagetune.epoch import train_one_epoch
    from stagetune.model import build_model

    config = make_config("training.num_time_mask=0", "training.num_freq_mask=0", "training.noise_eps=0")
    torch.manual_seed(0)
    model = build_model(config, 8, len(TOKENS) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(bad: bool) -> Batch:
        feats = torch.randn(2, 20, 8)
        if bad:
            feats[0, 3, 2] = float("nan")
        return Batch(feats, torch.tensor([20, 18]), torch.tensor([[1, 2], [3, -1]]), torch.tensor([2, 1]), ["a", "b"])

    def epoch(batches: list[Batch], scaler: torch.amp.GradScaler | None) -> float:
        loss_sum, frames = train_one_epoch(model, batches, optimizer, config, epoch=1, device=torch.device("cpu"),
                                           scaler=scaler)
        assert frames == 38 * len(batches)
        return loss_sum

    scaler = torch.amp.GradScaler("cpu")
    mixed = epoch([batch(False), batch(True), batch(False)], scaler)
    assert np.isfinite(mixed) and mixed > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN batch moved no weight
    assert np.isnan(epoch([batch(True), batch(True)], scaler))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # float32 (no scaler): the NaN batch's step spoils the weights, and the sum says so.
    assert not np.isfinite(epoch([batch(False), batch(True)], None))
