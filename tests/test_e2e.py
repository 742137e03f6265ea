"""End to end on the synthetic demo corpus, through the real CLI.

A good config learns the demo corpus and a config that cannot (one conv layer
and no recurrent layer sees only a few frames, too little context to tell
tokens apart) does not: the corpus and the metric discriminate.

Measured on 1 thread (seed 0 corpus, 120 train / 30 dev / 30 test utterances,
``conf/demo.ini`` at learning rate 0.004 for 10 epochs): test TER 8.4% (2.3%
and 11.5% with training seeds 2 and 1), about 20 s of training; the bad config
stays at 100%.  The thresholds below leave room for other CPUs' arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagetune.demo import make_demo_corpus

STAGETUNE = Path(sys.executable).with_name("stagetune")
DEMO_INI = Path(__file__).resolve().parents[1] / "conf" / "demo.ini"
#: conf/demo.ini is tuned for the 360-utterance corpus; a third of it needs a
#: larger step and a few more epochs.
SMALL_CORPUS = ("training.learning_rate=0.004", "training.num_epochs=10")
GOOD_TER, BAD_TER = 0.25, 0.5


def stagetune(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(STAGETUNE), "--device", "cpu", *map(str, args)], capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


def train_and_test_ter(corpus: Path, model_dir: Path, *settings: str) -> float:
    overrides = [arg for s in settings for arg in ("--set", s)]
    stagetune("--read-ini", DEMO_INI, *overrides, "train", "--threads", "1", "--quiet",
              corpus / "train", corpus / "dev", model_dir)
    result = stagetune("evaluate", "--threads", "1", "--json", model_dir / "model.pt", corpus / "test")
    counts = json.loads(result.stdout)
    assert counts["metric"] == "TER" and counts["utterances"] == 30
    return counts["rate"]


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_corpus(
        tmp_path_factory.mktemp("demo"), num_train=120, num_dev=30, num_test=30, variant="easy"
    )


@pytest.mark.slow
def test_demo_config_learns_the_demo_corpus(tmp_path: Path, demo_corpus: Path) -> None:
    ter = train_and_test_ter(demo_corpus, tmp_path / "good", *SMALL_CORPUS)
    assert ter < GOOD_TER


@pytest.mark.slow
def test_a_model_without_context_does_not(tmp_path: Path, demo_corpus: Path) -> None:
    ter = train_and_test_ter(
        demo_corpus, tmp_path / "bad", *SMALL_CORPUS,
        "model.recurrent_layers=0", "model.convolutional_layers=1",
    )
    assert ter > BAD_TER
