"""The tasks package and what came with it: utterance classification (task ``utt``),
``extract``, verification scoring, the debug subset, extra dev sets and the deep
bidirectional variant.  Real Kaldi dirs, the real CLI in a subprocess."""

from __future__ import annotations

import csv
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import torch
from fixtures_data import write_data_dir
from optim_helpers import assert_one_line_error, cli

from stagetune.config import Config
from stagetune.corpus import load_corpus, subset_corpus
from stagetune.errors import DataError
from stagetune.kaldi import load_data_dir
from stagetune.model import build_model
from stagetune.tasks import TASKS, UtteranceTask, task_of
from stagetune.verification import Trial, equal_error_rate, min_dcf, read_trials, score

torch.set_num_threads(1)

CLASSES = ("low", "mid", "high")
SMALL = [
    "--set", "model.convolutional_layers=1", "--set", "model.convolutional_initial_channels=4",
    "--set", "model.recurrent_layers=1", "--set", "model.recurrent_size=16", "--set", "model.task=utt",
    "--set", "data.normalization=global", "--set", "training.num_epochs=8", "--set", "model.embedding_size=8",
]


def _class_data(path: Path, num_utts: int, seed: int, with_classes: bool = True) -> Path:
    """Utterances whose class sets the mean of the features (low/mid/high): learnable by pooling."""
    rng = np.random.default_rng(seed)
    feats, utt2spk, classes = {}, {}, {}
    for i in range(num_utts):
        k = i % 3
        utt = f"s{i % 2}-u{seed}-{i:03d}"
        feats[utt] = rng.normal(3.0 * k, 1.0, size=(int(rng.integers(8, 25)), 6)).astype(np.float32)
        utt2spk[utt], classes[utt] = f"s{i % 2}", CLASSES[k]
    directory = write_data_dir(path, feats, utt2spk=utt2spk)
    if with_classes:
        (directory / "utt2class").write_text("".join(f"{u} {c}\n" for u, c in sorted(classes.items())))
    return directory


def test_utt2class_is_read_with_the_training_classes_and_refused_when_wrong(tmp_path: Path) -> None:
    train = load_data_dir(_class_data(tmp_path / "train", 9, 0), task="utt")
    assert train.classes == ["high", "low", "mid"]
    assert {int(train.targets(u)[0]) for u in train.utt_ids} == {0, 1, 2}
    dev_dir = _class_data(tmp_path / "dev", 6, 1)
    dev = load_data_dir(dev_dir, task="utt", classes=["high", "low", "mid"])
    assert all(train.classes[int(dev.targets(u)[0])] in CLASSES for u in dev.utt_ids)
    with pytest.raises(DataError, match=r"utt2class line \d+: utterance .* has class 'high', not one of the 2"):
        load_data_dir(dev_dir, task="utt", classes=["low", "mid"])
    (dev_dir / "utt2class").write_text("s0-u1-000 low mid\n")
    with pytest.raises(DataError, match=r"utt2class line 1: expected `UTT CLASS`, got 2 classes"):
        load_data_dir(dev_dir, task="utt")
    (dev_dir / "utt2class").unlink()
    with pytest.raises(DataError, match=r"utt2class is missing; task 'utt' needs one `UTT CLASS` line"):
        load_data_dir(dev_dir, task="utt")
    assert load_data_dir(dev_dir, task="utt", targets=False).targets("s0-u1-000").size == 0


@pytest.mark.parametrize("pooling", ["mean", "max", "meanstd", "attentive"])
def test_pooling_ignores_padding(pooling: str) -> None:
    config = Config()
    config.model.task, config.model.pooling, config.training.dropout_prob = "utt", pooling, 0.0
    torch.manual_seed(0)
    model = build_model(config, 8, 3).eval()
    feats = torch.randn(2, 40, 8)
    padded, _ = model(feats, torch.tensor([40, 24]))
    alone, _ = model(feats[1:, :24], torch.tensor([24]))
    assert padded.shape == (2, 1, 3)
    assert torch.allclose(padded[1], alone[0], atol=1e-5)


def test_the_angular_margin_lowers_the_target_score_only() -> None:
    task = UtteranceTask(margin=0.3, scale=10.0)
    cos = torch.tensor([[[0.5, 0.2, -0.1]]])
    target = torch.tensor([[0]])
    loss = task.loss(cos, torch.ones(1, dtype=torch.long), target, torch.ones(1, dtype=torch.long))
    margin_logits = torch.tensor([[np.cos(np.arccos(0.5) + 0.3), 0.2, -0.1]]) * 10.0
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(margin_logits, target[:, 0]).item(), rel=1e-5)
    assert task.decode(cos, torch.ones(1, dtype=torch.long)) == [[0]]  # the margin never moves the argmax
    assert task_of(Config()) is TASKS["ctc"]


def test_utterance_classification_trains_evaluates_and_extracts_through_the_cli(tmp_path: Path) -> None:
    train, dev = _class_data(tmp_path / "train", 60, 0), _class_data(tmp_path / "dev", 15, 1)
    test = _class_data(tmp_path / "test", 15, 2)
    done = cli([*SMALL, "train", train, dev, tmp_path / "m", "--quiet", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    evaluated = cli(["evaluate", tmp_path / "m" / "model.pt", test, "--out", tmp_path / "hyp.txt"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    rate = float(evaluated.stdout.split()[1].rstrip("%"))
    assert evaluated.stdout.startswith("UER ") and rate <= 20.0, evaluated.stdout
    hyps = dict(line.split() for line in (tmp_path / "hyp.txt").read_text().splitlines())
    assert set(hyps.values()) <= set(CLASSES) and len(hyps) == 15  # class names, not ids

    # Embeddings: one 8-dim vector per utterance, also for data without utt2class.
    unlabelled = _class_data(tmp_path / "unlabelled", 7, 3, with_classes=False)
    done = cli(["extract", tmp_path / "m" / "model.pt", unlabelled, tmp_path / "emb"], tmp_path)
    assert done.returncode == 0, done.stderr
    vectors = dict(kaldiio.load_scp(str(tmp_path / "emb.scp")).items())
    assert len(vectors) == 7 and {np.asarray(v).shape for v in vectors.values()} == {(8,)}
    done = cli(["extract", tmp_path / "m" / "model.pt", unlabelled, tmp_path / "frames.txt",
                "--format", "txt", "--level", "frame"], tmp_path)
    assert done.returncode == 0, done.stderr
    frames = dict(kaldiio.load_ark(str(tmp_path / "frames.txt")))
    lengths = {u: len(kaldiio.load_mat(s)) for u, s in
               (line.split() for line in (unlabelled / "feats.scp").read_text().splitlines())}
    # one convolution with the default time stride 2: ceil(T / 2) output frames of 32 (2 x 16) units
    assert {u: m.shape for u, m in frames.items()} == {u: ((t + 1) // 2, 32) for u, t in lengths.items()}
    done = cli(["extract", tmp_path / "m" / "model.pt", unlabelled, tmp_path / "emb.pt", "--format", "pt"], tmp_path)
    loaded = torch.load(tmp_path / "emb.pt")
    assert done.returncode == 0 and set(loaded) == set(vectors)
    assert all(np.allclose(loaded[u].numpy(), vectors[u], atol=1e-5) for u in vectors)

    # Verification scoring of those embeddings: a trials list over them.
    utts = sorted(vectors)
    (tmp_path / "trials").write_text("".join(f"{int(a[:2] == b[:2])} {a} {b}\n" for a in utts for b in utts if a < b))
    done = cli(["score-trials", tmp_path / "emb.scp", tmp_path / "trials", "--scores", tmp_path / "scores"], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("EER "), done.stderr
    assert len((tmp_path / "scores").read_text().splitlines()) == 21
    assert_one_line_error(cli(["score-trials", tmp_path / "missing.scp", tmp_path / "trials"], tmp_path),
                          "missing.scp: embeddings file does not exist")


def test_eer_and_min_dcf_agree_with_hand_computed_cases() -> None:
    # Perfect separation: no error at a threshold between the two groups.
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 0.0
    assert min_dcf([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 0.0
    # Targets 0.9, 0.3; non-targets 0.5, 0.1: at threshold 0.5 one miss of two and one
    # false alarm of two, so EER = 50%; with p = 0.5 the best cost is 0.25 (threshold
    # 0.9 or 0.3), normalised by 0.5.
    scores, labels = [0.9, 0.3, 0.5, 0.1], [1, 1, 0, 0]
    assert equal_error_rate(scores, labels) == 0.5
    assert min_dcf(scores, labels, p_target=0.5) == 0.5
    # Three targets (0.8, 0.6, 0.4), two non-targets (0.7, 0.2). Operating points
    # (miss, fa) as the threshold falls: (1, 0), (2/3, 0) at 0.8, (2/3, 1/2) at 0.7,
    # (1/3, 1/2) at 0.6, (0, 1/2) at 0.4, (0, 1) at 0.2. fa - miss turns from -1/6 to
    # +1/6 between 0.7 and 0.6: halfway, miss = (2/3 + 1/3) / 2 = 1/2.
    assert equal_error_rate([0.8, 0.6, 0.4, 0.7, 0.2], [1, 1, 1, 0, 0]) == pytest.approx(0.5)
    # p = 0.01: rejecting everything costs 0.01; accepting >= 0.8 costs 0.01 * 2/3, the
    # least (any false alarm costs 0.99 / 2); normalised by 0.01.
    assert min_dcf([0.8, 0.6, 0.4, 0.7, 0.2], [1, 1, 1, 0, 0], p_target=0.01) == pytest.approx(2 / 3)
    # Ties: a target and a non-target of one score move together.
    assert equal_error_rate([0.5, 0.5], [1, 0]) == 0.5


def test_cosine_scoring_and_trials_files(tmp_path: Path) -> None:
    embeddings = {"a": np.array([1.0, 0.0]), "b": np.array([2.0, 0.1]), "c": np.array([0.0, 3.0])}
    trials = [Trial(True, "a", "b"), Trial(False, "a", "c")]
    result = score(embeddings, trials)
    assert result.scores[1] == pytest.approx(0.0) and result.scores[0] > 0.99 and result.eer == 0.0
    path = tmp_path / "trials"
    path.write_text("a b target\nc a nontarget\n")
    assert read_trials(path) == [Trial(True, "a", "b"), Trial(False, "c", "a")]
    path.write_text("1 a b\n2 a c\n")
    with pytest.raises(DataError, match=r"trials line 2: expected `1\|0 UTT_A UTT_B`"):
        read_trials(path)
    path.write_text("1 a b\n1 a c\n")
    with pytest.raises(DataError, match="needs both target and non-target trials"):
        read_trials(path)
    with pytest.raises(DataError, match=r"no embedding for 1 utterance\(s\) of the trials, e.g. 'd'"):
        score(embeddings, [Trial(True, "a", "d"), Trial(False, "a", "c")])


def test_the_debug_subset_is_deterministic_nested_and_cuts_train_and_dev(tmp_path: Path) -> None:
    corpus = load_corpus(_class_data(tmp_path / "t", 60, 0), _class_data(tmp_path / "d", 30, 1), task="utt")
    small, larger = subset_corpus(corpus, 10), subset_corpus(corpus, 20)
    assert (len(small.train_ids), len(small.dev_ids)) == (10, 10)
    assert set(small.train_ids) <= set(larger.train_ids) and set(small.dev_ids) <= set(larger.dev_ids)
    assert subset_corpus(corpus, 10).train_ids == small.train_ids
    assert len(subset_corpus(corpus, 0.5).train_ids) == 30 and subset_corpus(corpus, 0) is corpus


def test_extra_dev_sets_are_logged_per_epoch_and_never_select(tmp_path: Path) -> None:
    train, dev = _class_data(tmp_path / "train", 30, 0), _class_data(tmp_path / "dev", 9, 1)
    other = _class_data(tmp_path / "other" / "dev", 6, 2)
    args = [*SMALL, "--set", "training.num_epochs=2", "--set", "data.subset=12", "train", train, dev,
            tmp_path / "m", "--quiet", "--extra-dev", other, "--extra-dev", tmp_path / "test"]
    assert_one_line_error(cli(args, tmp_path), "test")  # a missing extra dev dir: nothing trained
    assert not (tmp_path / "m").exists()
    done = cli(args[:-2], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "m" / "history.csv").open()))
    assert len(rows) == 2 and all(0 <= float(r["dev_error:dev"]) <= 1 for r in rows)
    assert {"dev_error:dev", "dev_loss:dev"} <= set(rows[0])


def test_separate_deep_forward_and_backward_stacks() -> None:
    config = Config()
    config.model.bidirectional_mode, config.training.dropout_prob = "stack", 0.0
    torch.manual_seed(0)
    model = build_model(config, 40, 5).eval()
    assert model.rnn is not None and not model.rnn.bidirectional and model.rnn_backward is not None
    feats = torch.randn(2, 50, 40)
    padded, lens = model(feats, torch.tensor([50, 30]))
    alone, _ = model(feats[1:, :30], torch.tensor([30]))
    assert torch.allclose(padded[1, : lens[1]], alone[0], atol=1e-5)
    # The backward stack reads the utterance reversed: the first frame's output sees the last input.
    changed = feats.clone()
    changed[0, 49] += 5.0
    assert not torch.allclose(model(changed, torch.tensor([50, 30]))[0][0, 0], padded[0, 0])


def test_optim_init_run_and_best_tune_an_utterance_classifier(tmp_path: Path) -> None:
    """The task's own parameter (model.pooling) is searched; best exports a model evaluate reads."""
    train, dev = _class_data(tmp_path / "train", 30, 0), _class_data(tmp_path / "dev", 9, 1)
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    init = cli([*SMALL, "--set", "training.num_epochs=2", "optim", "--study-name", "utt", url, "init", train,
                "--dev-dir", dev, "--num-trials", "3", "--whitelist", "model.pooling", "training.margin"], tmp_path)
    assert init.returncode == 0, init.stderr
    run = cli(["optim", "--study-name", "utt", url, "run", "--sampler", "random", "--seed", "0", "--quiet",
               "--ckpt-dir", tmp_path / "ckpt"], tmp_path)
    assert run.returncode == 0, run.stderr
    import optuna

    study = optuna.load_study(study_name="utt", storage=url)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]  # hyperband may prune
    assert len(finished) == 3 and any(t.state.name == "COMPLETE" for t in finished)
    assert all(t.params["model.pooling"] in ("mean", "max", "meanstd", "attentive") for t in finished)
    best = cli(["optim", "--study-name", "utt", url, "best", tmp_path / "best.ini", "--model",
                tmp_path / "best.pt", "--ckpt-dir", tmp_path / "ckpt"], tmp_path)
    assert best.returncode == 0, best.stderr
    assert "task = utt" in (tmp_path / "best.ini").read_text()
    evaluated = cli(["evaluate", tmp_path / "best.pt", dev], tmp_path)
    assert evaluated.returncode == 0 and evaluated.stdout.startswith("UER "), evaluated.stderr
