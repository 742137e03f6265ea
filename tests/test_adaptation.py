"""Adaptation to a base model (``stagetune train --adapt-from BASE.pt``, ``training.adapt_rho``).

The divergence term on real task outputs, ``fit`` in-process on real Kaldi dirs
(rho = 0 is plain fine-tuning bit for bit, the base is recorded and a resume
with another base refused), and the CLI in a subprocess (one-line errors, an
end-to-end run).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import write_data_dir
from optim_helpers import assert_one_line_error, cli

from stagetune.adaptation import ADAPT_KEY, Adaptation, divergence, file_hash
from stagetune.checkpoint import load_model_file, save_model_file
from stagetune.config import load_config
from stagetune.corpus import load_corpus
from stagetune.errors import UsageError
from stagetune.model import build_model
from stagetune.tasks import CTCTask, FrameTask, MultiTask, RegressionTask, UtteranceTask, task_of
from stagetune.training import fit

torch.set_num_threads(1)

CLASSES = ("low", "mid", "high")
SMALL = [
    "model.convolutional_layers=1", "model.convolutional_initial_channels=4", "model.recurrent_layers=1",
    "model.recurrent_size=16", "model.task=utt", "model.embedding_size=8", "data.min_batches_per_epoch=4",
]


def _class_data(path: Path, num_utts: int, seed: int, feat_dim: int = 6, shift: float = 0.0) -> Path:
    """Utterances whose class sets the features' mean (learnable by pooling); ``shift`` moves every mean."""
    rng = np.random.default_rng(seed)
    feats, utt2spk, classes = {}, {}, {}
    for i in range(num_utts):
        k = i % 3
        utt = f"s{seed}-{i:03d}"
        size = (int(rng.integers(8, 25)), feat_dim)
        feats[utt] = rng.normal(3.0 * k + shift, 1.0, size=size).astype(np.float32)
        utt2spk[utt], classes[utt] = f"s{seed}", CLASSES[k]
    directory = write_data_dir(path, feats, utt2spk=utt2spk, cmvn=True)
    (directory / "utt2class").write_text("".join(f"{u} {c}\n" for u, c in sorted(classes.items())))
    return directory


def _fit(tmp: Path, name: str, train: Path, dev: Path, *sets: str, **kwargs) -> Path:
    config = load_config((), [*SMALL, *sets])
    corpus = load_corpus(train, dev, task="utt")
    fit(config, corpus, tmp / name, device="cpu", quiet=True, **kwargs)
    return tmp / name


def _history(model_dir: Path) -> list[dict[str, str]]:
    with (model_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(base model.pt, adaptation train dir, adaptation dev dir)``: a base trained on one speaker."""
    tmp = tmp_path_factory.mktemp("adapt")
    train, dev = _class_data(tmp / "train", 30, 1), _class_data(tmp / "dev", 9, 2)
    model_dir = _fit(tmp, "base", train, dev, "training.num_epochs=3")
    new_train, new_dev = _class_data(tmp / "new", 12, 3, shift=1.0), _class_data(tmp / "new-dev", 6, 4, shift=1.0)
    return model_dir / "model.pt", new_train, new_dev


# --- the divergence term ---------------------------------------------------------------------


def _lens(batch: int, frames: int) -> torch.Tensor:
    return torch.tensor([frames] + [max(1, frames - 3 - i) for i in range(batch - 1)])


@pytest.mark.parametrize("task", [CTCTask(), FrameTask(), UtteranceTask()], ids=lambda t: t.name)
def test_kl_is_zero_for_the_base_itself_and_positive_otherwise(task) -> None:
    gen = torch.Generator().manual_seed(0)
    frames = 1 if task.name == "utt" else 9
    logits = torch.randn(4, frames, 5, generator=gen)
    out_lens = torch.ones(4, dtype=torch.long) if task.name == "utt" else _lens(4, frames)
    targets = torch.zeros(4, 1, dtype=torch.long)
    assert divergence(task, logits, logits.clone(), out_lens, targets).item() == 0.0
    other = logits + torch.randn(logits.shape, generator=gen)
    value = divergence(task, logits, other, out_lens, targets)
    # KL(base || model) per valid output frame, averaged over the valid frames.
    mask = torch.arange(frames) < out_lens.unsqueeze(1)
    per_frame = F.kl_div(logits.log_softmax(-1), other.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert value.item() > 0
    assert value.item() == pytest.approx(per_frame[mask].mean().item(), rel=1e-5)
    # What lies beyond a frame's length (padding) does not count.
    padded = other.clone()
    padded[~mask] = 100.0
    assert divergence(task, logits, padded, out_lens, targets).item() == pytest.approx(value.item(), rel=1e-6)


def test_regression_uses_mse_and_multitask_weights_each_subtask() -> None:
    gen = torch.Generator().manual_seed(1)
    out_lens = _lens(3, 7)
    mask = (torch.arange(7) < out_lens.unsqueeze(1)).unsqueeze(-1)
    model, base = torch.randn(3, 7, 2, generator=gen), torch.randn(3, 7, 2, generator=gen)
    mse = (((model - base) ** 2) * mask).sum() / (mask.sum() * 2)
    regress = divergence(RegressionTask(), model, base, out_lens, torch.zeros(3, 7, 2))
    assert regress.item() == pytest.approx(mse.item(), rel=1e-6)
    assert divergence(RegressionTask(), model, model.clone(), out_lens, torch.zeros(3, 7, 2)).item() == 0.0
    # multi: 4 frame classes and 2 regression values (targets: a label and 2 values per frame).
    logits, base_logits = torch.randn(3, 7, 6, generator=gen), torch.randn(3, 7, 6, generator=gen)
    targets = torch.zeros(3, 7, 3)
    kl = divergence(FrameTask(), logits[..., :4], base_logits[..., :4], out_lens, targets)
    values = divergence(RegressionTask(), logits[..., 4:], base_logits[..., 4:], out_lens, targets)
    multi = divergence(MultiTask(("frame", "regress"), (1.0, 0.25)), logits, base_logits, out_lens, targets)
    assert multi.item() == pytest.approx(kl.item() + 0.25 * values.item(), rel=1e-6)


def test_the_adaptation_loss_mixes_task_loss_and_divergence_by_rho() -> None:
    config = load_config((), SMALL)
    torch.manual_seed(0)
    model, other = build_model(config, 6, 3), build_model(config, 6, 3)
    model.eval()
    feats, feat_lens = torch.randn(2, 12, 6), torch.tensor([12, 9])
    logits, out_lens = model(feats, feat_lens)
    task, task_loss, targets = task_of(config), torch.tensor(2.0), torch.tensor([[0], [2]])
    same = Adaptation(model, 0.5).loss(task, task_loss, logits, out_lens, feats, feat_lens, targets)
    assert same.item() == pytest.approx(1.0)  # the base itself: no divergence
    other.eval()
    with torch.no_grad():
        base_logits, _ = other(feats, feat_lens)
    expected = 0.2 * 2.0 + 0.8 * divergence(task, logits, base_logits, out_lens, targets)
    mixed = Adaptation(other, 0.8).loss(task, task_loss, logits, out_lens, feats, feat_lens, targets)
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-6) and mixed.item() > 0.4
    assert Adaptation(other, 0.0).loss(task, task_loss, logits, out_lens, feats, feat_lens, targets) is task_loss


# --- fit -----------------------------------------------------------------------------------------


def test_rho_zero_is_plain_fine_tuning_bit_for_bit_and_rho_changes_training(tmp_path: Path, base) -> None:
    base_pt, train, dev = base
    epochs = "training.num_epochs=2"
    plain = _history(_fit(tmp_path, "init", train, dev, epochs, init_from=base_pt))
    zero = _history(_fit(tmp_path, "rho0", train, dev, epochs, adapt_from=base_pt))
    half = _history(_fit(tmp_path, "rho5", train, dev, epochs, "training.adapt_rho=0.5", adapt_from=base_pt))
    losses = lambda rows: [(r["train_loss"], r["dev_loss"], r["dev_error"]) for r in rows]  # noqa: E731
    assert losses(zero) == losses(plain)
    assert [r["train_loss"] for r in half] != [r["train_loss"] for r in plain]
    # The model file and the checkpoint name the base: its path and a hash of its bytes.
    stored = load_model_file(tmp_path / "rho5" / "model.pt").extra[ADAPT_KEY]
    assert stored == {"path": str(base_pt.resolve()), "hash": file_hash(base_pt)}
    assert load_model_file(tmp_path / "init" / "model.pt").extra[ADAPT_KEY] is None


def test_resuming_with_another_base_or_none_is_refused(tmp_path: Path, base) -> None:
    base_pt, train, dev = base
    _fit(tmp_path, "adapted", train, dev, "training.num_epochs=1", "training.adapt_rho=0.5", adapt_from=base_pt)
    other = tmp_path / "other.pt"
    obj = torch.load(base_pt, weights_only=False)
    obj["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    torch.save(obj, other)
    before = (tmp_path / "adapted" / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match=r"was adapted from .*base/model\.pt .*this run from .*other\.pt"):
        _fit(tmp_path, "adapted", train, dev, "training.num_epochs=2", "training.adapt_rho=0.5", adapt_from=other)
    with pytest.raises(UsageError, match="give --adapt-from"):
        _fit(tmp_path, "adapted", train, dev, "training.num_epochs=2", "training.adapt_rho=0.5")
    assert (tmp_path / "adapted" / "checkpoint.pt").read_bytes() == before
    # The same base (copied elsewhere: the hash is its identity) resumes.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(base_pt.read_bytes())
    _fit(tmp_path, "adapted", train, dev, "training.num_epochs=2", "training.adapt_rho=0.5", adapt_from=copy)
    assert len(_history(tmp_path / "adapted")) == 2


# --- the CLI -------------------------------------------------------------------------------------


def _sets(*values: str) -> list[str]:
    return [arg for value in (*SMALL, *values) for arg in ("--set", value)]


def _foreign_base(path: Path, source: Path, *, task: str | None = None, feat_dim: int | None = None) -> Path:
    """A real model file like ``source`` but of another task or feature dimension."""
    mf = load_model_file(source)
    config = load_config((), [*SMALL, f"model.task={task or mf.config.model.task}"])
    dim = feat_dim or mf.feat_dim
    tokens = list(mf.tokens)
    model = build_model(config, dim, task_of(config).num_outputs(len(tokens) + (task == "ctc")))
    save_model_file(path, state_dict=model.state_dict(), config=config, feat_dim=dim, tokens=tokens)
    return path


def test_a_base_of_another_task_or_feature_dim_is_a_one_line_error(tmp_path: Path, base) -> None:
    base_pt, train, dev = base
    cases = [
        (_foreign_base(tmp_path / "ctc.pt", base_pt, task="ctc"), "its task is 'ctc', this run's is 'utt'"),
        (_foreign_base(tmp_path / "dim.pt", base_pt, feat_dim=9), "its features have dimension 9, this data's 6"),
    ]
    for bad, needle in cases:
        done = cli(["train", train, dev, tmp_path / "out", "--adapt-from", bad, "--quiet", *_sets()], tmp_path)
        assert_one_line_error(done, f"--adapt-from {bad}", needle)
        assert not (tmp_path / "out").exists()
    done = cli(["train", train, dev, tmp_path / "out", *_sets("training.adapt_rho=0.5")], tmp_path)
    assert_one_line_error(done, "training.adapt_rho = 0.5 needs a base model")
    done = cli(["train", train, dev, tmp_path / "out", "--adapt-from", base_pt, "--init-from", base_pt], tmp_path)
    assert_one_line_error(done, "give --init-from or --adapt-from, not both")
    assert not (tmp_path / "out").exists()


def test_cli_adapts_with_rho_half_end_to_end(tmp_path: Path, base) -> None:
    base_pt, train, dev = base
    done = cli(["train", train, dev, tmp_path / "adapted", "--adapt-from", base_pt, "--quiet",
                *_sets("training.adapt_rho=0.5", "training.num_epochs=2")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "best dev error" in done.stdout
    assert len(_history(tmp_path / "adapted")) == 2
    assert load_model_file(tmp_path / "adapted" / "model.pt").extra[ADAPT_KEY]["hash"] == file_hash(base_pt)
    done = cli(["evaluate", tmp_path / "adapted" / "model.pt", dev, "--json"], tmp_path)
    assert done.returncode == 0 and '"rate"' in done.stdout, done.stderr


def test_the_adapted_model_normalises_as_its_base(tmp_path: Path, base) -> None:
    _, train, dev = base
    other_train = _class_data(tmp_path / "base-train", 12, 5)
    glob = _fit(tmp_path, "global-base", other_train, dev, "training.num_epochs=1", "data.normalization=global")
    base_pt = glob / "model.pt"
    # Global statistics are the base's, not refitted on the (shifted) adaptation data.
    adapted = _fit(tmp_path, "adapted", train, dev, "training.num_epochs=1", "data.normalization=global",
                   "training.adapt_rho=0.5", adapt_from=base_pt)
    stored, theirs = (load_model_file(p).extra["normalization"] for p in (adapted / "model.pt", base_pt))
    assert np.array_equal(stored["mean"], theirs["mean"]) and np.array_equal(stored["std"], theirs["std"])
    refit = load_model_file(_fit(tmp_path, "refit", train, dev, "training.num_epochs=1",
                                 "data.normalization=global", init_from=base_pt) / "model.pt")
    assert not np.array_equal(refit.extra["normalization"]["mean"], theirs["mean"])
    with pytest.raises(UsageError, match="it normalises features with mode 'global', this run with 'speaker'"):
        _fit(tmp_path, "speaker", train, dev, "training.num_epochs=1", adapt_from=base_pt)
    assert not (tmp_path / "speaker").exists()


def test_studies_never_tune_adapt_rho_without_a_base_model() -> None:
    """A study's trials adapt no base model, so rho would be a dead search dimension."""
    from stagetune.config import Config
    from stagetune.optim.sampling import select_tunable

    selection = select_tunable(Config())
    assert "training.adapt_rho" not in selection.tuned
    assert "training.adapt_rho" not in dict(selection.dropped)  # never applies: no notice
    assert "training.adapt_rho" not in select_tunable(Config(), whitelist=["training\\..*"]).tuned
