"""Tests for stagetune.model: the acoustic model, its lengths, and the task heads."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stagetune import config as cfg
from stagetune.config import Config, ModelConfig
from stagetune.metrics import ErrorCounts, ctc_greedy_decode, edit_distance
from stagetune.model import (
    NONLINEARITIES,
    RECURRENT_CELLS,
    AcousticModel,
    build_model,
)
from stagetune.tasks import TASKS, subsample_labels

torch.set_num_threads(1)


def _model_config(**overrides: object) -> ModelConfig:
    small = dict(
        convolutional_layers=2,
        convolutional_initial_channels=2,
        recurrent_layers=1,
        recurrent_size=4,
    )
    small.update(overrides)
    return dataclasses.replace(ModelConfig(), **small)


def _random_config(rng: random.Random) -> ModelConfig:
    layers = rng.randint(0, 4)
    return _model_config(
        convolutional_layers=layers,
        convolutional_initial_channels=rng.randint(1, 3),
        convolutional_kernel_time=rng.randint(1, 15),
        convolutional_kernel_freq=rng.randint(1, 6),
        convolutional_factor_sched=rng.randint(1, max(layers, 1)),
        convolutional_time_factor=rng.randint(1, 4),
        convolutional_freq_factor=rng.randint(1, 4),
        convolutional_channel_factor=rng.randint(1, 2),
        convolutional_nonlinearity=rng.choice(sorted(NONLINEARITIES)),
        recurrent_layers=rng.randint(0, 2),
        recurrent_size=rng.randint(1, 4),
        recurrent_type=rng.choice(sorted(RECURRENT_CELLS)),
        recurrent_bidirectional=rng.random() < 0.5,
        frame_norm=rng.choice(("none", "layer")),
    )


# ----------------------------------------------------------------------------- registries


def test_registries_match_config_choices() -> None:
    assert set(NONLINEARITIES) == set(cfg.NONLINEARITIES)
    assert set(RECURRENT_CELLS) == set(cfg.RECURRENT_TYPES)
    assert set(TASKS) == set(cfg.TASKS)
    assert all(task.name == name for name, task in TASKS.items())


def test_every_registered_choice_builds_and_runs() -> None:
    feats, lens = torch.randn(2, 9, 5), torch.tensor([9, 4])
    for nonlinearity in NONLINEARITIES:
        for cell in RECURRENT_CELLS:
            model = AcousticModel(
                _model_config(convolutional_nonlinearity=nonlinearity, recurrent_type=cell), 5, 3
            )
            assert type(model.conv_activations[0]) is type(NONLINEARITIES[nonlinearity]())
            assert isinstance(model.rnn, RECURRENT_CELLS[cell])
            logits, _ = model(feats, lens)
            assert torch.isfinite(logits).all()


def test_model_module_does_not_import_optuna_or_training() -> None:
    code = (
        "import sys, stagetune.model, stagetune.failures; "
        "bad = [m for m in sys.modules if m == 'optuna' or m.startswith(('stagetune.training', "
        "'stagetune.optim'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- architecture


def test_channel_and_stride_schedule() -> None:
    model = AcousticModel(
        _model_config(
            convolutional_layers=4,
            convolutional_factor_sched=2,
            convolutional_initial_channels=3,
            convolutional_channel_factor=2,
            convolutional_time_factor=3,
            convolutional_freq_factor=2,
        ),
        feat_dim=16,
        num_outputs=5,
    )
    assert [c.out_channels for c in model.convs] == [3, 3, 6, 6]
    assert [c.stride for c in model.convs] == [(1, 1), (3, 2), (1, 1), (3, 2)]
    assert model.time_stride == 9
    model = AcousticModel(
        _model_config(
            convolutional_layers=3, convolutional_factor_sched=1, convolutional_initial_channels=3
        ),
        feat_dim=16,
        num_outputs=5,
    )
    assert [c.out_channels for c in model.convs] == [3, 6, 12]
    assert [c.stride for c in model.convs] == [(2, 2)] * 3
    assert model.time_stride == 8
    # A schedule longer than the stack means no downsampling.
    model = AcousticModel(
        _model_config(convolutional_layers=2, convolutional_factor_sched=3), 16, 5
    )
    assert [c.stride for c in model.convs] == [(1, 1), (1, 1)]
    assert model.time_stride == 1


def test_recurrent_stack_reads_flattened_conv_output() -> None:
    # freq 16 -> 8 -> 4 with two stride-2 layers; channels 2 then 4.
    model = AcousticModel(
        _model_config(recurrent_layers=3, recurrent_size=7, recurrent_type="lstm"), 16, 5
    )
    assert model.rnn.input_size == 4 * 4
    assert model.rnn.num_layers == 3 and model.rnn.bidirectional
    assert model.output.in_features == 14
    logits, out_lens = model(torch.randn(2, 11, 16), torch.tensor([11, 5]))
    assert logits.shape == (2, 3, 5)  # time 11 -> 6 -> 3
    assert out_lens.tolist() == [3, 2]


def test_frame_norm_normalises_what_the_recurrent_stack_reads() -> None:
    config = _model_config(
        convolutional_layers=2, convolutional_initial_channels=3, convolutional_freq_factor=2,
        recurrent_layers=1, frame_norm="layer",
    )
    model = AcousticModel(config, feat_dim=8, num_outputs=4)
    assert model.frame_norm is not None
    assert model.frame_norm.normalized_shape == (model.rnn.input_size,)
    seen: list[torch.Tensor] = []
    model.rnn.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].data))
    model(torch.randn(2, 7, 8) * 50 + 9, torch.tensor([7, 7]))
    frames = seen[0]  # packed: one row per valid frame
    torch.testing.assert_close(frames.mean(-1), torch.zeros(len(frames)), atol=1e-4, rtol=0)
    assert AcousticModel(dataclasses.replace(config, frame_norm="none"), 8, 4).frame_norm is None


def test_without_conv_layers_features_go_straight_to_the_rnn() -> None:
    model = AcousticModel(_model_config(convolutional_layers=0, recurrent_size=6), 7, 4)
    assert model.rnn.input_size == 7
    assert model.time_stride == 1
    logits, out_lens = model(torch.randn(3, 10, 7), torch.tensor([10, 3, 1]))
    assert logits.shape == (3, 10, 4)
    assert out_lens.tolist() == [10, 3, 1]


def test_without_recurrent_layers_the_output_reads_the_conv_stack() -> None:
    model = AcousticModel(_model_config(recurrent_layers=0), 16, 5)
    assert model.rnn is None
    assert model.output.in_features == 4 * 4
    logits, _ = model(torch.randn(2, 12, 16), torch.tensor([12, 5]))
    assert logits.shape == (2, 3, 5)


def test_linear_model_and_parameter_count() -> None:
    model = AcousticModel(_model_config(convolutional_layers=0, recurrent_layers=0), 5, 7)
    assert model.num_parameters() == 5 * 7 + 7
    feats = torch.randn(1, 4, 5)
    logits, _ = model(feats, torch.tensor([4]))
    torch.testing.assert_close(logits, model.output(feats))
    big = AcousticModel(_model_config(), 16, 5)
    assert big.num_parameters() == sum(p.numel() for p in big.parameters()) > 0


@pytest.mark.parametrize("kernel_freq", [1, 2, 3, 4])
def test_frequency_axis_never_collapses(kernel_freq: int) -> None:
    model = AcousticModel(
        _model_config(
            convolutional_layers=6,
            convolutional_kernel_freq=kernel_freq,
            convolutional_freq_factor=4,
            convolutional_time_factor=1,
        ),
        feat_dim=3,
        num_outputs=2,
    )
    logits, _ = model(torch.randn(2, 5, 3), torch.tensor([5, 2]))
    assert logits.shape == (2, 5, 2) and torch.isfinite(logits).all()


def test_build_model_uses_model_section_and_dropout() -> None:
    config = Config(
        model=_model_config(recurrent_layers=2),
        training=dataclasses.replace(cfg.TrainingConfig(), dropout_prob=0.3),
    )
    model = build_model(config, 16, 5)
    assert isinstance(model, AcousticModel)
    assert [d.p for d in model.conv_dropouts] == [0.3, 0.3]
    assert model.rnn.dropout == 0.3 and model.rnn_dropout.p == 0.3
    feats, lens = torch.randn(2, 12, 16), torch.tensor([12, 7])
    model.train()
    assert not torch.equal(model(feats, lens)[0], model(feats, lens)[0])
    model.eval()
    torch.testing.assert_close(model(feats, lens)[0], model(feats, lens)[0], rtol=0, atol=0)


def test_forward_rejects_inconsistent_inputs() -> None:
    model = AcousticModel(_model_config(), 16, 5)
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        model(torch.randn(2, 10, 15), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="feat_lens must have shape"):
        model(torch.randn(2, 10, 16), torch.tensor([10]))
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        model(torch.randn(2, 10, 16), torch.tensor([11, 3]))
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        model(torch.randn(2, 10, 16), torch.tensor([10, 0]))
    with pytest.raises(ValueError, match="allowed: gelu, relu, sigmoid, tanh"):
        AcousticModel(_model_config(convolutional_nonlinearity="swish"), 16, 5)


# ----------------------------------------------------------------------------- lengths


def test_output_lengths_hand_computed() -> None:
    odd = AcousticModel(_model_config(convolutional_kernel_time=3), 8, 2)
    assert odd.output_lengths(torch.tensor([1, 2, 9, 10, 11])).tolist() == [1, 1, 3, 3, 3]
    even = AcousticModel(
        _model_config(convolutional_kernel_time=4, convolutional_time_factor=1), 8, 2
    )
    assert even.output_lengths(torch.tensor([1, 10])).tolist() == [3, 12]  # +1 per layer
    assert odd.output_lengths(10) == 3


def test_output_lengths_equal_actual_frames() -> None:
    rng = random.Random(0)
    for _ in range(80):
        config = _random_config(rng)
        model = AcousticModel(config, feat_dim=rng.randint(1, 6), num_outputs=3).eval()
        lengths = [1, 2, 3] + [rng.randint(4, 40) for _ in range(3)]
        predicted = model.output_lengths(torch.tensor(lengths)).tolist()
        with torch.no_grad():
            for length, expected in zip(lengths, predicted):
                feats = torch.randn(1, length, model.feat_dim)
                logits, out_lens = model(feats, torch.tensor([length]))
                assert logits.size(1) == expected == out_lens.item(), (config, length)
                assert expected >= 1


@pytest.mark.parametrize("seed", range(12))
def test_padding_does_not_change_valid_outputs(seed: int) -> None:
    rng = random.Random(seed)
    config = _random_config(rng)
    if seed % 3 == 0:  # make sure bias + sigmoid (nonzero on zero input) is covered
        config = dataclasses.replace(
            config, convolutional_nonlinearity="sigmoid", convolutional_layers=3
        )
    if seed % 2 == 0:
        config = dataclasses.replace(config, recurrent_layers=2, recurrent_bidirectional=True)
    feat_dim = rng.randint(1, 6)
    model = AcousticModel(config, feat_dim, num_outputs=4).eval()
    lengths = [rng.randint(20, 30), rng.randint(1, 19), rng.randint(1, 19)]
    utterances = [torch.randn(length, feat_dim) for length in lengths]
    padded_to = max(lengths) + 3  # padding beyond even the longest utterance
    batch = torch.full((3, padded_to, feat_dim), 7.5)  # padding is garbage, not zeros
    for i, utterance in enumerate(utterances):
        batch[i, : len(utterance)] = utterance
    with torch.no_grad():
        logits, out_lens = model(batch, torch.tensor(lengths))
        for i, utterance in enumerate(utterances):
            alone, alone_lens = model(utterance.unsqueeze(0), torch.tensor([len(utterance)]))
            assert out_lens[i] == alone_lens[0] == alone.size(1)
            torch.testing.assert_close(logits[i, : out_lens[i]], alone[0], rtol=1e-5, atol=1e-5)


def test_backward_direction_starts_at_each_utterance_end() -> None:
    # Only the first frame of the short utterance is compared: in a backward
    # pass over padding it would see the padded frames first.
    model = AcousticModel(
        _model_config(convolutional_layers=0, recurrent_type="lstm", recurrent_layers=1), 3, 2
    ).eval()
    short = torch.randn(4, 3)
    batch = torch.zeros(2, 12, 3)
    batch[0] = torch.randn(12, 3)
    batch[1, :4] = short
    with torch.no_grad():
        logits, _ = model(batch, torch.tensor([12, 4]))
        alone, _ = model(short.unsqueeze(0), torch.tensor([4]))
    torch.testing.assert_close(logits[1, 0], alone[0, 0])


# ----------------------------------------------------------------------------- subsampling


def test_subsample_labels_takes_the_centre_of_each_stride_window() -> None:
    labels = torch.arange(10).unsqueeze(0)
    sub, lens = subsample_labels(labels, torch.tensor([10]), 4)
    assert lens.tolist() == [3]
    assert sub.tolist() == [[2, 6, 9]]  # 10 is past the end: clamped to the last frame
    sub, _ = subsample_labels(labels, torch.tensor([10]), 1)
    assert sub.tolist() == labels.tolist()
    sub, _ = subsample_labels(labels, torch.tensor([10]), 3)
    assert sub.tolist() == [[1, 4, 7, 9]]


def test_subsample_labels_pads_and_follows_given_lengths() -> None:
    labels = torch.tensor([[5, 5, 6, 6, 7, 7, 8, 8], [1, 2, 3, -1, -1, -1, -1, -1]])
    sub, lens = subsample_labels(labels, torch.tensor([8, 3]), 2)
    assert lens.tolist() == [4, 2]
    assert sub.tolist() == [[5, 6, 7, 8], [2, 3, -1, -1]]
    # Model lengths with an extra frame (even kernel) and a wider logits tensor.
    sub, lens = subsample_labels(
        labels, torch.tensor([8, 3]), 2, out_lens=torch.tensor([5, 3]), num_frames=6
    )
    assert sub.tolist() == [[5, 6, 7, 8, 8, -1], [2, 3, 3, -1, -1, -1]]
    with pytest.raises(ValueError, match="factor"):
        subsample_labels(labels, torch.tensor([8, 3]), 0)


# ----------------------------------------------------------------------------- CTC task


def _logits_for_paths(paths: list[list[int]], num_outputs: int, num_frames: int) -> torch.Tensor:
    logits = torch.full((len(paths), num_frames, num_outputs), -4.0)
    for b, path in enumerate(paths):
        for t, symbol in enumerate(path):
            logits[b, t, symbol] = 4.0
    return logits


def test_ctc_num_outputs_includes_blank() -> None:
    assert TASKS["ctc"].num_outputs(6) == 6
    with pytest.raises(ValueError, match="<blank>"):
        TASKS["ctc"].num_outputs(1)


def test_ctc_loss_matches_reference_for_padded_and_concatenated_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 5)
    out_lens = torch.tensor([12, 9, 6])
    padded = torch.tensor([[1, 2, 3, 4], [2, 2, -1, -1], [4, -1, -1, -1]])
    target_lens = torch.tensor([4, 2, 1])
    concatenated = torch.tensor([1, 2, 3, 4, 2, 2, 4])
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    expected = F.ctc_loss(log_probs, concatenated, out_lens, target_lens, reduction="mean")
    task = TASKS["ctc"]
    torch.testing.assert_close(task.loss(logits, out_lens, padded, target_lens), expected)
    torch.testing.assert_close(task.loss(logits, out_lens, concatenated, target_lens), expected)
    # Frames past out_lens do not matter.
    changed = logits.clone()
    changed[2, 6:] = 100.0
    torch.testing.assert_close(task.loss(changed, out_lens, padded, target_lens), expected)


def test_ctc_loss_is_float32_and_finite_for_infeasible_targets() -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([[1, 2, 3, 4, 1], [1, -1, -1, -1, -1]])  # 5 labels > 3 frames
    loss = TASKS["ctc"].loss(logits, torch.tensor([3, 3]), targets, torch.tensor([5, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_ctc_decode_collapses_and_respects_lengths() -> None:
    logits = _logits_for_paths([[0, 1, 1, 0, 1, 2, 2, 0, 3], [2, 2, 0, 3, 4, 4, 4, 4, 4]], 5, 9)
    hyps = TASKS["ctc"].decode(logits, torch.tensor([8, 4]))
    assert hyps == [[1, 1, 2], [2, 3]]
    torch.manual_seed(1)
    random_logits = torch.randn(4, 15, 6)
    lens = torch.tensor([15, 10, 3, 1])
    hyps = TASKS["ctc"].decode(random_logits, lens)
    for b in range(4):
        assert hyps[b] == ctc_greedy_decode(random_logits[b, : lens[b]].numpy())


def test_ctc_references_and_errors() -> None:
    task = TASKS["ctc"]
    targets = torch.tensor([[1, 2, 3], [4, -1, -1]])
    refs = task.references(targets, torch.tensor([3, 1]), torch.tensor([10, 10]))
    assert refs == [[1, 2, 3], [4]]
    concatenated = torch.tensor([1, 2, 3, 4])
    assert task.references(concatenated, torch.tensor([3, 1]), torch.tensor([9, 9])) == refs
    counts = task.errors(refs, [[1, 3], [4, 4]])
    assert counts == edit_distance([1, 2, 3], [1, 3]) + edit_distance([4], [4, 4])
    assert (counts.deletions, counts.insertions) == (1, 1)
    assert (counts.ref_length, counts.utterances) == (4, 2)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        task.errors(refs, [[1]])


# ----------------------------------------------------------------------------- frame task


def test_frame_loss_is_cross_entropy_over_subsampled_valid_frames() -> None:
    torch.manual_seed(0)
    task = TASKS["frame"]
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1], [2, 2, 2, 0, -1, -1, -1, -1]])
    lens = torch.tensor([8, 4])
    out_lens = torch.tensor([4, 2])
    logits = torch.randn(2, 4, 3, requires_grad=True)
    loss = task.loss(logits, out_lens, labels, lens, time_stride=2)
    # Output frames take input frames 1, 3, 5, 7: [0, 1, 2, 1] and [2, 0].
    expected = F.cross_entropy(
        torch.cat([logits[0], logits[1, :2]]), torch.tensor([0, 1, 2, 1, 2, 0])
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[1, 2:].abs().sum() == 0  # padded frames get no gradient
    with pytest.raises(ValueError, match="time_stride=model.time_stride"):
        task.loss(logits, out_lens, labels, lens)


def test_frame_decode_references_and_errors() -> None:
    task = TASKS["frame"]
    assert task.num_outputs(3) == 3
    logits = _logits_for_paths([[0, 1, 2, 1], [2, 2, 1, 1]], 3, 4)
    out_lens = torch.tensor([4, 2])
    hyps = task.decode(logits, out_lens)
    assert hyps == [[0, 1, 2, 1], [2, 2]]
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1], [2, 2, 0, 0, -1, -1, -1, -1]])
    refs = task.references(labels, torch.tensor([8, 4]), out_lens, time_stride=2)
    assert refs == [[0, 1, 2, 1], [2, 0]]
    counts = task.errors(refs, hyps)
    assert counts == ErrorCounts(substitutions=1, ref_length=6, utterances=2)
    with pytest.raises(ValueError, match="subsampled to the output frames"):
        task.errors([[0, 0, 1, 1]], [[0, 1]])


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("task_name", ["ctc", "frame", "utt"])  # regress, multi: tests/test_tasks_regression.py
def test_a_tiny_model_fits_a_tiny_batch(task_name: str) -> None:
    torch.manual_seed(0)
    task = TASKS[task_name]
    config = Config(
        model=_model_config(task=task_name, recurrent_size=16, convolutional_initial_channels=4),
        training=dataclasses.replace(cfg.TrainingConfig(), dropout_prob=0.0),
    )
    model = build_model(config, 8, task.num_outputs(4))
    feats, lens = torch.randn(3, 16, 8), torch.tensor([16, 12, 9])
    if task_name == "ctc":
        targets = torch.tensor([[1, 2, 3], [3, 1, -1], [2, -1, -1]])
        target_lens = torch.tensor([3, 2, 1])
    elif task_name == "utt":  # one class per utterance
        targets, target_lens = torch.tensor([[0], [3], [2]]), torch.ones(3, dtype=torch.long)
    else:
        targets, target_lens = torch.randint(0, 4, (3, 16)), lens
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        logits, out_lens = model(feats, lens)
        loss = task.loss(logits, out_lens, targets, target_lens, time_stride=model.time_stride)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        logits, out_lens = model(feats, lens)
    refs = task.references(targets, target_lens, out_lens, time_stride=model.time_stride)
    assert task.errors(refs, task.decode(logits, out_lens)).rate < 0.2
