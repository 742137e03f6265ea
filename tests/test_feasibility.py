"""CTC feasibility (stagetune.feasibility): utterances a time stride leaves too few output frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import write_data_dir

from stagetune.config import load_config
from stagetune.corpus import load_corpus
from stagetune.feasibility import InfeasibleStride, check_feasible, find_shortfall
from stagetune.model import build_model, output_lengths
from stagetune.tasks import TASKS

TOKENS = ("A", "B", "C")


def test_frames_needed_is_exactly_where_ctc_turns_infinite() -> None:
    rng = np.random.default_rng(0)
    targets = [rng.integers(1, 3, size=n) for n in rng.integers(1, 9, size=40)]  # many repeats
    needed = TASKS["ctc"].frames_needed(targets)
    assert needed.tolist() == [len(t) + int((t[1:] == t[:-1]).sum()) for t in targets]
    for t, frames in zip(targets, needed.tolist()):
        for available, finite in ((frames, True), (frames - 1, False)):
            log_probs = torch.randn(max(available, 1), 1, 3).log_softmax(-1)
            loss = torch.nn.functional.ctc_loss(
                log_probs, torch.as_tensor(t)[None], torch.tensor([available]),
                torch.tensor([len(t)]), reduction="sum",
            )
            assert bool(torch.isfinite(loss)) == finite, (t, available)
    edge_cases = [np.array([2, 2]), np.array([2]), np.array([], dtype=np.int64)]
    assert TASKS["ctc"].frames_needed(edge_cases).tolist() == [3, 1, 0]
    assert TASKS["frame"].frames_needed([np.array([0, 1, 1])]).tolist() == [0]


def test_output_lengths_from_the_config_match_the_model() -> None:
    for settings in (
        [],
        ["model.convolutional_layers=0"],
        ["model.convolutional_layers=3", "model.convolutional_factor_sched=2"],
        ["model.convolutional_layers=4", "model.convolutional_time_factor=3", "model.convolutional_kernel_time=4"],
    ):
        config = load_config((), settings)
        lengths = torch.arange(1, 200)
        model = build_model(config, 8, 4)
        assert torch.equal(output_lengths(config.model, lengths), model.output_lengths(lengths))
        from_config = output_lengths(config.model, np.arange(1, 200))
        assert from_config.tolist() == model.output_lengths(lengths).tolist()


@pytest.fixture
def ctc_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    frames = {"a": 40, "b": 8, "c": 12, "d": 7}
    text = {"a": ["A", "B", "C"], "b": ["A", "A", "B", "B"], "c": ["C"], "d": ["B", "C"]}
    feats = {u: rng.normal(size=(n, 4)).astype(np.float32) for u, n in frames.items()}
    return write_data_dir(tmp_path / "ctc", feats, text, tokens=TOKENS)


def test_shortfall_counts_splits_and_names_the_worst_utterance(ctc_dir: Path) -> None:
    corpus = load_corpus(ctc_dir, ctc_dir)  # the same utterances as train and dev
    # Stride 4 (two layers of 2): b 8 -> 2 frames needs 6, d 7 -> 2 needs 2, c 12 -> 3 needs 1.
    config = load_config((), ["model.convolutional_layers=2"])
    shortfall = find_shortfall(config, corpus)
    assert shortfall is not None
    assert shortfall.time_stride == 4
    assert (shortfall.affected, shortfall.totals) == ({"train": 1, "dev": 1}, {"train": 4, "dev": 4})
    assert shortfall.example == ("train", "b", 8, 2, 6, 4)
    with pytest.raises(InfeasibleStride) as raised:
        check_feasible(config, corpus)
    assert raised.value.exit_code == 2 and str(raised.value) == shortfall.message()
    # Less time subsampling, or none: feasible.
    for fix in (
        "model.convolutional_time_factor=1", "model.convolutional_factor_sched=3", "model.convolutional_layers=0"
    ):
        assert find_shortfall(load_config((), ["model.convolutional_layers=2", fix]), corpus) is None


def test_the_frame_task_is_never_short(tiny_frame_data_dir: Path) -> None:
    corpus = load_corpus(tiny_frame_data_dir, task="frame")
    settings = ["model.task=frame", "model.convolutional_layers=4", "model.convolutional_time_factor=4"]
    config = load_config((), settings)
    assert find_shortfall(config, corpus) is None
