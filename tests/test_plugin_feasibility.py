"""CTC feasibility for plugin encoders: their own output lengths, declared or measured.

A plugin encoder that subsamples time must not leave utterances fewer output
frames than CTC needs without a word.  The example TDNN (examples/plugin)
declares ``time_stride`` and ``output_lengths``; a bare plugin written here
declares neither and is measured by running it.  Both are installed with pip
into this test's own directory and run through the real CLI (as in
tests/test_plugins.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from fixtures_data import write_data_dir
from optim_helpers import assert_one_line_error
from test_plugins import EXAMPLE, _site, run, sets, trials
from torch import nn

from stagetune.feasibility import measured_lengths

TOKENS = ("A", "B", "C", "D")
SMALL = ["tdnn.layers=2", "tdnn.channels=8", "data.batch_size=2", "training.num_epochs=1"]

# T frames through a stride of s give ceil(T / s) output frames (the TDNN and the bare encoder alike).
# Stride 4: 'mid' 12 -> 3 < 4 tokens, 'short' 7 -> 2 < 3 tokens + 1 repeat, 'dev-rep' 8 -> 2 < 2 + 1 repeat;
# 'rep' 10 -> 3 = 2 + 1 repeat is exactly enough.  Stride 2 leaves every utterance enough.
TRAIN = {"long-1": (40, "A B"), "long-2": (48, "C A B"), "mid": (12, "A B C D"), "rep": (10, "A A"),
         "short": (7, "A A B")}
DEV = {"dev-1": (32, "B C"), "dev-rep": (8, "D D")}
SHORT_AT_4 = (
    "leaves 2 of 5 train and 1 of 2 dev utterances fewer output frames than CTC needs (e.g. 'short' in "
    "train: 7 frames -> 2 output frames, needs 4 = 3 tokens + 1 adjacent repeat); "
)

BARE = '''
from dataclasses import dataclass

from stagetune.plugins import Plugin
from stagetune.space import param


@dataclass
class BareConfig:
    """[bare]: one strided convolution, with neither time_stride nor output_lengths."""

    stride: int = param(1, "Time stride.", min=1, max=8)


plugin = Plugin(build="stagetune_bare.encoder:Bare", section=BareConfig)
'''
BARE_ENCODER = '''
from torch import nn


class Bare(nn.Module):
    def __init__(self, section, feat_dim, config):
        super().__init__()
        self.stride = section.stride
        self.conv = nn.Conv1d(feat_dim, 8, 3, stride=section.stride, padding=1)
        self.state_dim = 8

    def encode(self, feats, feat_lens):
        lens = feat_lens.to(feats.device)  # on the meta device, so are the output lengths
        return self.conv(feats.transpose(1, 2)).transpose(1, 2), (lens - 1) // self.stride + 1
'''


def _data(root: Path, utts: dict[str, tuple[int, str]]) -> Path:
    rng = np.random.default_rng(0)
    feats = {u: rng.normal(size=(n, 8)).astype(np.float32) for u, (n, _) in utts.items()}
    return write_data_dir(root, feats, {u: t.split() for u, (_, t) in utts.items()}, tokens=TOKENS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return _data(root / "train", TRAIN), _data(root / "dev", DEV)


@pytest.fixture(scope="module")
def tdnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _site(tmp_path_factory.mktemp("tdnn"), EXAMPLE)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("bare-src")
    package = src / "src" / "stagetune_bare"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BARE)
    (package / "encoder.py").write_text(BARE_ENCODER)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "stagetune-bare"\nversion = "0.1"\n'
        '[project.entry-points."stagetune.encoders"]\nbare = "stagetune_bare:plugin"\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n'
    )
    return _site(tmp_path_factory.mktemp("bare"), src)


def _train(settings: list[str], data: tuple[Path, Path], model_dir: Path, site: Path):  # type: ignore[no-untyped-def]
    args = [*sets(settings), "--device", "cpu", "train", "--threads", "1", "--quiet", *data, model_dir]
    return run(args, model_dir.parent, site)


def test_a_plugin_encoder_striding_time_too_much_is_refused_and_a_feasible_stride_trains(
    tdnn: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    done = _train(["model.encoder=tdnn", "tdnn.time_stride=4", *SMALL], data, model_dir, tdnn)
    assert done.returncode == 2
    assert assert_one_line_error(done) == (
        "stagetune: error: a total time stride of 4 (declared by the tdnn encoder's time_stride and "
        f"output_lengths) {SHORT_AT_4}subsample time less: change the [tdnn] settings that stride time"
    )
    assert not model_dir.exists()  # refused before anything was written
    done = _train(["model.encoder=tdnn", "tdnn.time_stride=2", *SMALL], data, model_dir, tdnn)
    assert done.returncode == 0, done.stderr
    stored = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=False)
    assert "'time_stride': 2" in repr(stored)  # the [tdnn] section it trained with


def test_an_optim_trial_with_an_infeasible_plugin_stride_is_pruned_with_the_reason(
    tdnn: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    settings = sets(["model.encoder=tdnn", "tdnn.time_stride=4", *SMALL])
    init = run([*settings, "optim", "--study-name", "s", url, "init", data[0], "--dev-dir", data[1],
                "--whitelist", "training\\.learning_rate", "--num-trials", "1", "--sampler", "random",
                "--pruner", "none"], tmp_path, tdnn)
    assert init.returncode == 0, init.stderr
    done = run(["--device", "cpu", "optim", "--study-name", "s", url, "run"], tmp_path, tdnn)
    assert done.returncode == 0, done.stderr
    (trial,) = trials(url, "s")
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["prune_reason"] == (
        "a total time stride of 4 (declared by the tdnn encoder's time_stride and output_lengths) "
        f"{SHORT_AT_4}subsample time less: change the [tdnn] settings that stride time"
    )
    assert trial.user_attrs["short_utterances"] == {"train": 2, "dev": 1}
    assert "epoch" not in trial.user_attrs and not trial.intermediate_values


def test_an_encoder_without_length_hooks_is_measured(bare: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    done = _train(["model.encoder=bare", "bare.stride=4", "data.batch_size=2", "training.num_epochs=1"],
                  data, model_dir, bare)
    assert done.returncode == 2
    assert assert_one_line_error(done) == (
        "stagetune: error: a total time stride of 4 (measured by running the bare encoder on the meta device) "
        f"{SHORT_AT_4}subsample time less: change the [bare] settings that stride time"
    )
    done = _train(["model.encoder=bare", "bare.stride=2", "data.batch_size=2", "training.num_epochs=1"],
                  data, model_dir, bare)
    assert done.returncode == 0, done.stderr


class _Strided(nn.Module):
    """Convolutions and a pooling, strides 2 and 3, kernels of every parity: no length hooks."""

    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv1d(feat_dim, 4, 4, stride=2, padding=1), nn.Conv1d(4, 4, 5, padding=2),
            nn.MaxPool1d(3, stride=3, ceil_mode=True), nn.Conv1d(4, 4, 2, padding=1),
        )
        self.state_dim = 4

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.layers(feats.transpose(1, 2)).transpose(1, 2)
        return states, torch.full_like(feat_lens, states.size(1))  # one utterance at a time only


class _Sqrt(_Strided):
    """Output frames ~ sqrt(input frames): no stride at all."""

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = max(1, int(feats.size(1) ** 0.5))
        states = nn.functional.adaptive_avg_pool1d(feats.transpose(1, 2), out).transpose(1, 2)
        return states, torch.full_like(feat_lens, out)


@pytest.mark.parametrize("encoder", [_Strided, _Sqrt])
def test_measured_lengths_are_exact_from_a_few_runs_or_every_length(encoder: type[nn.Module]) -> None:
    lengths = np.random.default_rng(0).integers(3, 400, size=300).tolist()
    on_cpu = encoder(6)
    truth = {}
    with torch.no_grad():
        for n in sorted(set(lengths)):
            truth[n] = int(on_cpu.encode(torch.zeros(1, n, 6), torch.tensor([n]))[0].size(1))
    with torch.device("meta"):
        on_meta = encoder(6)
    assert measured_lengths(on_meta, 6, lengths) == truth
    assert measured_lengths(on_cpu, 6, lengths) == truth
