"""The ``stagetune`` command line, run as users run it: the console script in a subprocess.

Covers ``--help`` (instant: no torch, no optuna), ``--print-ini`` / ``--read-ini``
round trips, ``prep``, ``train`` then ``evaluate`` from nothing but ``model.pt``
(greedy and beam search, Kaldi-format hypotheses), the frame task, and the
contract for bad input: a non-zero exit, one ``stagetune: error:`` line on
stderr, no traceback and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import write_data_dir
from stagetune.audio import Utterance, write_wav_data_dir
from stagetune.config import load_config
from stagetune.demo import SPEAKERS, synthesize_utterance
from stagetune.kaldi import load_data_dir

STAGETUNE = Path(sys.executable).with_name("stagetune")
TOKENS = ("A", "B", "C", "D", "E")
TRAIN_SETTINGS = (
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=32",
    "training.num_epochs=4",
    "training.learning_rate=0.01",
    "training.num_time_mask=0",
    "training.num_freq_mask=0",
    "data.batch_size=2",
)


def stagetune(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the console script on cpu (the reference numbers are cpu numbers)."""
    return subprocess.run(
        [str(STAGETUNE), "--device", "cpu", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stagetune: error: "), result.stderr
    return lines[0]


def write_token_data(path: Path, num_utts: int, *, seed: int) -> Path:
    """CTC data where each token is a few frames of its own pattern (learnable in seconds)."""
    rng = np.random.default_rng(seed)
    feats, text = {}, {}
    for i in range(num_utts):
        utt = f"spk{i % 3}-u{seed}{i:03d}"
        ids = rng.integers(0, len(TOKENS), size=int(rng.integers(1, 5)))
        frames = [rng.normal(0.0, 0.3, (int(rng.integers(1, 4)), 8))]
        for t in ids:
            pattern = np.full(8, -1.0)
            pattern[[t, t + 3]] = 2.0
            frames.append(pattern + rng.normal(0.0, 0.3, (int(rng.integers(3, 7)), 8)))
            frames.append(rng.normal(0.0, 0.3, (int(rng.integers(1, 4)), 8)))
        feats[utt] = np.concatenate(frames).astype(np.float32)
        text[utt] = [TOKENS[t] for t in ids]
    return write_data_dir(path, feats, text, tokens=TOKENS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "train": write_token_data(root / "train", 80, seed=0),
        "test": write_token_data(root / "test", 30, seed=1),
        "root": root,
    }


@pytest.fixture(scope="module")
def trained(data: dict[str, Path]) -> Path:
    """``stagetune train`` on the token data; returns the model dir."""
    model_dir = data["root"] / "model"
    result = stagetune(*sets(*TRAIN_SETTINGS), "train", "--threads", "1", "--quiet",
                       data["train"], model_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("best dev error ")
    assert result.stdout.rstrip().endswith(f"(4 epochs); model: {model_dir / 'model.pt'}")
    return model_dir


def evaluate_json(model: Path, data_dir: Path, *args: str) -> dict:
    result = stagetune("evaluate", "--threads", "1", "--json", *args, model, data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def greedy(data: dict[str, Path], trained: Path) -> tuple[Path, Path, dict]:
    """Greedy ``evaluate --out`` of a copy of model.pt alone in another dir: (model, hyps, counts)."""
    alone = data["root"] / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(trained / "model.pt", alone)
    hyp = data["root"] / "out" / "hyp.txt"
    return alone, hyp, evaluate_json(alone, data["test"], "--out", str(hyp))


# -- help and configuration ----------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["prep"], ["train"], ["evaluate"], ["optim"]])
def test_help_is_instant_and_imports_neither_torch_nor_optuna(command: list[str]) -> None:
    started = time.monotonic()
    result = stagetune(*command, "--help")
    elapsed = time.monotonic() - started
    assert result.returncode == 0
    assert result.stdout.startswith("usage: stagetune")
    assert elapsed < 1.0, f"stagetune {' '.join(command)} --help took {elapsed:.2f} s"
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "stagetune", *command, "--help"],
        capture_output=True, text=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "optuna", "sqlalchemy"))
    assert not heavy, f"--help imports {heavy[:5]}"


def test_help_lists_every_command() -> None:
    usage = stagetune("--help").stdout
    for command in ("prep", "train", "evaluate", "optim"):
        assert f"    {command}" in usage


def test_print_ini_reads_back_equal(tmp_path: Path) -> None:
    overrides = sets("training.learning_rate=0.003", "model.recurrent_type=lstm", "data.normalization=none")
    first = stagetune(*overrides, "--print-ini")
    assert first.returncode == 0 and first.stderr == ""
    ini = tmp_path / "resolved.ini"
    ini.write_text(first.stdout)
    second = stagetune("--read-ini", ini, "--print-ini")
    assert second.stdout == first.stdout
    assert load_config([ini]) == load_config([], overrides[1::2])
    # Every field is documented, and later --set wins over --read-ini.
    assert "# Peak learning rate (reached after the warm-up)." in first.stdout
    third = stagetune("--read-ini", ini, "--set", "training.learning_rate=0.5", "--print-ini")
    assert "learning_rate = 0.5\n" in third.stdout


def test_global_options_after_the_command_accumulate_in_order(tmp_path: Path) -> None:
    ini = tmp_path / "late.ini"
    ini.write_text("[training]\nlearning_rate = 0.02\nseed = 9\n")
    # --print-ini shows what train would read; train's paths are not looked at.
    result = stagetune(*sets("training.num_epochs=2", "training.seed=1"), "--print-ini",
                       "train", "--set", "training.num_epochs=3", "--read-ini", ini, "--device", "cpu",
                       tmp_path / "train", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    # INI files first (--read-ini), then every --set in command-line order.
    assert "\nnum_epochs = 3\n" in result.stdout
    assert "\nseed = 1\n" in result.stdout
    assert "\nlearning_rate = 0.02\n" in result.stdout
    assert not (tmp_path / "model").exists()


# -- prep, train, evaluate -------------------------------------------------------------------


def test_prep_computes_features_for_a_wav_data_dir(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    speaker = SPEAKERS["train"][0]
    utterances = [
        Utterance(f"{speaker.name}-u{i}", speaker.name, tokens,
                  synthesize_utterance(tokens, speaker, rng))
        for i, tokens in enumerate([["ASI"], ["OTE", "UMA"], ["EME", "ISA", "UXO"]])
    ]
    write_wav_data_dir(tmp_path / "wavs", utterances, 8000)
    result = stagetune("prep", "--num-mel-bins", "23", tmp_path / "wavs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"prepared {tmp_path / 'wavs'}: 3 utterances, 1 speaker")
    assert "; derived tokens.txt from text" in result.stdout
    data = load_data_dir(tmp_path / "wavs")
    assert data.feat_dim == 23
    assert sorted(data.utt_ids) == sorted(u.utt for u in utterances)


def test_evaluate_needs_nothing_but_model_pt(data: dict[str, Path], greedy: tuple[Path, Path, dict]) -> None:
    alone, hyp, counts = greedy
    assert counts["metric"] == "TER"
    assert counts["utterances"] == 30
    assert counts["rate"] < 0.3, counts

    # Kaldi text: "UTT TOKEN ...", sorted by utterance id, symbols from tokens.txt.
    lines = hyp.read_text().splitlines()
    ids = [line.split()[0] for line in lines]
    reference = dict(line.split(maxsplit=1) for line in (data["test"] / "text").read_text().splitlines())
    assert ids == sorted(reference)
    assert {tok for line in lines for tok in line.split()[1:]} <= set(TOKENS)
    correct = sum(line.split(maxsplit=1)[1:] == [reference[line.split()[0]]] for line in lines)
    assert correct >= len(lines) // 2, "most hypotheses should be exactly right"

    plain = stagetune("evaluate", "--threads", "1", alone, data["test"])
    assert plain.stdout.startswith(f"TER {counts['rate']:.2%} (S=")
    assert plain.stdout.rstrip().endswith(f"on 30 utterances of {data['test']}")


def test_beam_search_is_not_worse_than_greedy(
    data: dict[str, Path], greedy: tuple[Path, Path, dict]
) -> None:
    model, _, best_path = greedy
    beam = evaluate_json(model, data["test"], "--beam-width", "4")
    assert beam["utterances"] == best_path["utterances"] == 30
    assert beam["rate"] <= best_path["rate"] + 0.02, (best_path, beam)


def test_frame_task_trains_and_evaluates(tmp_path: Path, tiny_frame_data_dir: Path) -> None:
    model_dir = tmp_path / "frame"
    train = stagetune(
        *sets("model.task=frame", "model.convolutional_layers=1", "model.recurrent_size=16",
              "training.num_epochs=2", "data.batch_size=4"),
        "train", "--threads", "1", "--quiet", tiny_frame_data_dir, model_dir,
    )
    assert train.returncode == 0, train.stderr
    assert "(2 epochs)" in train.stdout
    evaluate = stagetune("evaluate", "--threads", "1", model_dir / "model.pt", tiny_frame_data_dir)
    assert evaluate.returncode == 0, evaluate.stderr
    assert evaluate.stdout.startswith("FER ")
    assert f"on 12 utterances of {tiny_frame_data_dir}" in evaluate.stdout


# -- bad input --------------------------------------------------------------------------------


def _bad_ini(tmp_path: Path) -> Path:
    path = tmp_path / "bad.ini"
    path.write_text("[trainig]\nnum_epochs = 3\n")
    return path


def _no_feats(tmp_path: Path, data: dict[str, Path]) -> Path:
    broken = tmp_path / "no_feats"
    shutil.copytree(data["train"], broken)
    (broken / "feats.scp").unlink()
    return broken


# (id, argv from (tmp_path, data, model_dir), exit code, substring of the message)
BAD_INPUTS = [
    ("missing data dir", lambda t, d, m: ["train", t / "nowhere", m], 1, "does not exist"),
    ("missing feats.scp", lambda t, d, m: ["train", _no_feats(t, d), m], 1, "feats.scp is missing"),
    ("bad --set value", lambda t, d, m: ["--set", "training.learning_rate=fast", "train", d["train"], m],
     2, "expected a finite number, got 'fast'"),
    ("bad --set form", lambda t, d, m: ["--set", "epochs", "train", d["train"], m], 2, "SECTION.KEY=VALUE"),
    ("unknown --set key", lambda t, d, m: ["--set", "training.epochs=3", "train", d["train"], m],
     2, "unknown parameter 'training.epochs'"),
    ("unknown INI section", lambda t, d, m: ["--read-ini", _bad_ini(t), "train", d["train"], m],
     2, "unknown section [trainig]"),
    ("train with 1 path", lambda t, d, m: ["train", m], 2, "got 1 paths"),
    ("train with 4 paths", lambda t, d, m: ["train", d["train"], d["train"], d["train"], m], 2, "got 4 paths"),
    ("nonexistent model.pt", lambda t, d, m: ["evaluate", m / "model.pt", d["train"]], 1, "no such model file"),
    ("speaker without cmvn.scp", lambda t, d, m: ["--set", "data.normalization=speaker", "train", d["train"], m],
     1, "cmvn.scp is missing; per-speaker normalisation (data.normalization = speaker) needs it"),
    ("nonexistent --init-from", lambda t, d, m: ["train", "--init-from", t / "none.pt", d["train"], m],
     1, "no such model file"),
]


@pytest.mark.parametrize(
    ("argv", "exit_code", "expected"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    tmp_path: Path, data: dict[str, Path], argv, exit_code: int, expected: str
) -> None:
    model_dir = tmp_path / "model"
    result = stagetune(*argv(tmp_path, data, model_dir))
    assert result.returncode == exit_code
    assert expected in assert_one_error_line(result)
    assert result.stdout == ""
    assert not model_dir.exists()


def test_bad_print_ini_is_one_error_line(tmp_path: Path) -> None:
    result = stagetune("--read-ini", _bad_ini(tmp_path), "--print-ini")
    assert result.returncode == 2
    assert "unknown section [trainig]; allowed: [model], [training], [data]" in assert_one_error_line(result)


@pytest.mark.parametrize(
    "env, taskset, expected",
    [
        ({"SLURM_CPUS_PER_TASK": "6"}, None, 3),  # a Slurm job's allocation, not the node's cores
        ({}, "0", 1),  # CPU affinity: one CPU allowed
        ({"SLURM_CPUS_PER_TASK": "bogus"}, "0", 1),  # unusable: falls back to the affinity
    ],
)
def test_default_threads_follow_the_cpus_the_process_may_use(
    env: dict[str, str], taskset: str | None, expected: int
) -> None:
    command = [*(["taskset", "-c", taskset] if taskset else []), str(STAGETUNE), "train", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    assert f"here {expected})" in " ".join(done.stdout.split()), done.stdout
