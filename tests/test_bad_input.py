"""Bad input at the real command line: one table row per mistake a user makes.

Each row runs the ``stagetune`` console script in a subprocess and asserts what a
user relies on when they get something wrong:

* the exit code (2 for usage and configuration mistakes, 1 for data and runtime
  problems);
* exactly one ``stagetune: error: ...`` line on stderr, holding the expected words,
  no traceback, and nothing on stdout;
* nothing half-written: every file under the case's own directory and under the
  shared fixtures (data dirs, a trained model, a study database) is byte for byte
  what it was, SQLite databases compared by their rows; so the model dir a case
  names is not created, and no ``*.tmp`` file is left anywhere.

The shared fixtures are built once: a tiny CTC train/dev pair and variants of it,
a wav dir, a model trained for one epoch and a SQLite study with three told
trials. Rows never train beyond what they need: each fails before training.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir
from optim_helpers import LR_DOMINATED, create_study, fill_study

from stagetune.audio import Utterance, write_wav_data_dir

STAGETUNE = Path(sys.executable).with_name("stagetune")
#: A model small enough that a case which wrongly started training would still end fast.
SMALL = (
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=8",
    "training.num_epochs=1",
)
STUDY = "bad"


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


@dataclass(frozen=True)
class World:
    """The shared fixtures, plus the directory of the case at hand (``tmp``)."""

    root: Path
    train: Path
    dev: Path
    dev_empty: Path
    dev_wide: Path
    wavs: Path
    model: Path
    db: Path
    tmp: Path = Path("/nonexistent")

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    @property
    def model_dir(self) -> Path:
        """The MODEL_DIR a case names; it must not exist afterwards."""
        return self.tmp / "model"

    @property
    def model_pt(self) -> Path:
        return self.model / "model.pt"

    def file(self, name: str, content: str | bytes) -> Path:
        """A file of the case's own."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def dir(self, name: str) -> Path:
        """An (empty) directory of the case's own."""
        path = self.tmp / name
        path.mkdir(parents=True)
        return path

    def copy(self, source: Path, name: str) -> Path:
        """A copy of a shared data dir the case may break."""
        return Path(shutil.copytree(source, self.tmp / name))

    def train_without(self, *names: str) -> Path:
        """A copy of the train dir without the named files."""
        broken = self.copy(self.train, "broken")
        for name in names:
            (broken / name).unlink()
        return broken

    def train_with(self, name: str, text: str) -> Path:
        """A copy of the train dir with one file replaced."""
        broken = self.copy(self.train, "broken")
        (broken / name).write_text(text)
        return broken


def _token_data(path: Path, *, seed: int, feat_dim: int = 8, empty: bool = False) -> Path:
    feats, utt2spk = random_feats(20, feat_dim, seed=seed)
    rng = np.random.default_rng(seed)
    text = {
        utt: [] if empty else [TINY_TOKENS[j] for j in rng.integers(0, 5, size=rng.integers(1, 5))]
        for utt in feats
    }
    return write_data_dir(path, feats, text, tokens=TINY_TOKENS, utt2spk=utt2spk)


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}


def stagetune(root: Path, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STAGETUNE), "--device", "cpu", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=_env(root),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    train = _token_data(root / "train", seed=0)
    rng = np.random.default_rng(0)
    utterances = [
        Utterance(f"spk-u{i}", "spk", ["A"], rng.normal(0, 3000, 8000).astype(np.int16))
        for i in range(3)
    ]
    write_wav_data_dir(root / "wavs", utterances, 8000)
    model = root / "model"
    trained = stagetune(root, *sets(*SMALL), "train", "--threads", "1", "--quiet", train, model)
    assert trained.returncode == 0, trained.stderr
    db = root / "db" / "optim.db"
    db.parent.mkdir()  # optim init creates the database file, not its directory
    spec = create_study(
        f"sqlite:///{db}", STUDY, train, overrides=SMALL,
        whitelist=[re.escape(name) for name in LR_DOMINATED], num_trials=3,
    )
    fill_study(f"sqlite:///{db}", STUDY, spec, 3)
    return World(
        root=root,
        train=train,
        dev=_token_data(root / "dev", seed=1),
        dev_empty=_token_data(root / "dev_empty", seed=2, empty=True),
        dev_wide=_token_data(root / "dev_wide", seed=3, feat_dim=16),
        wavs=root / "wavs",
        model=model,
        db=db,
    )


def _sqlite_rows(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        return hashlib.sha1("\n".join(connection.iterdump()).encode()).hexdigest()
    finally:
        connection.close()


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every file and directory under ``root``.

    Caches (normalisation statistics) and SQLite's transient ``-wal``/``-shm``
    files are left out; a database counts by its rows, not its bytes.
    """
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if ".stagetune" in rel.parts or rel.parts[0] == "cache":
            continue
        if path.name.endswith(("-wal", "-shm", "-journal")):
            continue
        if path.is_dir():
            state[str(rel)] = "dir"
        elif path.suffix == ".db":
            state[str(rel)] = _sqlite_rows(path)
        else:
            state[str(rel)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return state


class Case(NamedTuple):
    id: str
    argv: Callable[[World], list]
    exit_code: int
    expected: str


def _train(*args: str | Path) -> list[str | Path]:
    return [*sets(*SMALL), "train", "--threads", "1", "--quiet", *args]


MIB = 1 << 20

CASES = [
    # -- --set ----------------------------------------------------------------------------------
    Case("set not a number", lambda w: ["--set", "training.learning_rate=fast", "--print-ini"],
         2, "--set training.learning_rate: expected a finite number, got 'fast'"),
    Case("set without =", lambda w: ["--set", "epochs", "--print-ini"], 2, "expected SECTION.KEY=VALUE"),
    Case("set without section", lambda w: ["--set", "num_epochs=3", "--print-ini"],
         2, "expected SECTION.KEY=VALUE"),
    Case("set unknown key", lambda w: ["--set", "training.epochs=3", "--print-ini"],
         2, "unknown parameter 'training.epochs'; [training] has num_epochs"),
    Case("set unknown section", lambda w: ["--set", "optim.trials=3", "--print-ini"],
         2, "sections are model, training, data"),
    Case("set float for int", lambda w: ["--set", "training.num_epochs=2.5", "--print-ini"],
         2, "expected an integer, got '2.5'"),
    Case("set empty value", lambda w: ["--set", "training.num_epochs=", "--print-ini"],
         2, "expected an integer, got ''"),
    Case("set bad bool", lambda w: ["--set", "model.recurrent_bidirectional=maybe", "--print-ini"],
         2, "expected true or false"),
    Case("set bad choice", lambda w: ["--set", "model.recurrent_type=transformer", "--print-ini"],
         2, "allowed: lstm, gru, rnn"),
    Case("set nan", lambda w: ["--set", "training.learning_rate=nan", "--print-ini"],
         2, "expected a finite number, got 'nan'"),
    Case("set inf", lambda w: ["--set", "training.dropout_prob=inf", "--print-ini"],
         2, "expected a finite number, got 'inf'"),
    Case("set below min", lambda w: ["--set", "training.num_epochs=0", "--print-ini"],
         2, "got 0; must be >= 1"),
    Case("set above max", lambda w: ["--set", "training.dropout_prob=0.95", "--print-ini"],
         2, "got 0.95; must be <= 0.9"),
    Case("seed beyond 64 bits at train", lambda w: ["--set", "training.seed=18446744073709551616",
                                                     *_train(w.train, w.model_dir)],
         2, "training.seed: got 18446744073709551616; must be <= 9223372036854775807"),
    Case("negative seed", lambda w: ["--set", "training.seed=-1", "--print-ini"], 2, "must be >= 0"),
    Case("recurrent_size of 120 GB at train", lambda w: ["--set", "model.convolutional_layers=1",
                                                          "--set", "model.recurrent_size=100000",
                                                          "train", "--threads", "1", w.train, w.model_dir],
         2, "model.recurrent_size: got 100000; must be <= 8192"),
    Case("huge conv channels", lambda w: ["--set", "model.convolutional_initial_channels=100000",
                                          "--print-ini"], 2, "must be <= 4096"),
    Case("batch size 0", lambda w: ["--set", "data.batch_size=0", "--print-ini"], 2, "must be >= 1"),
    Case("batch size too large", lambda w: ["--set", "data.batch_size=5000", "--print-ini"],
         2, "must be <= 4096"),
    Case("too many conv layers", lambda w: ["--set", "model.convolutional_layers=13", "--print-ini"],
         2, "must be <= 12"),
    Case("factor schedule beyond layers", lambda w: [*sets("model.convolutional_layers=2",
                                                           "model.convolutional_factor_sched=5"),
                                                      "--print-ini"],
         2, "must be <= model.convolutional_layers"),
    Case("bad normalization", lambda w: ["--set", "data.normalization=cmvn", "--print-ini"],
         2, "allowed: auto, none, global, speaker, utterance"),
    Case("renamed burn-in in epochs", lambda w: ["--set", "training.reduce_lr_burnin=3", "--print-ini"],
         2, "replace it with training.reduce_lr_burnin_updates=N"),
    # -- --read-ini -------------------------------------------------------------------------------
    Case("ini unknown section", lambda w: ["--read-ini", w.file("a.ini", "[trainig]\nnum_epochs = 3\n"),
                                           "--print-ini"],
         2, "unknown section [trainig]; allowed: [model], [training], [data]"),
    Case("ini DEFAULT section", lambda w: ["--read-ini", w.file("a.ini", "[DEFAULT]\nseed = 1\n[model]\n"),
                                           "--print-ini"],
         2, "a.ini: unknown section [DEFAULT]"),
    Case("ini DEFAULT alone", lambda w: ["--read-ini", w.file("a.ini", "[DEFAULT]\nrecurrent_size = 3\n"),
                                         "--print-ini"],
         2, "unknown section [DEFAULT]"),
    Case("ini with BOM blames the key", lambda w: [
        "--read-ini", w.file("a.ini", b"\xef\xbb\xbf[model]\nrecurent_size = 3\n"), "--print-ini"],
         2, "a.ini [model]: unknown key 'recurent_size'"),
    Case("ini without section", lambda w: ["--read-ini", w.file("a.ini", "num_epochs = 3\n"),
                                           "--print-ini"],
         2, "not a valid INI file: File contains no section headers"),
    Case("ini duplicate key", lambda w: ["--read-ini", w.file("a.ini", "[model]\nrecurrent_size = 3\n"
                                                                       "recurrent_size = 4\n"),
                                         "--print-ini"],
         2, "not a valid INI file"),
    Case("ini unknown key", lambda w: ["--read-ini", w.file("a.ini", "[training]\nepochs = 3\n"),
                                       "--print-ini"],
         2, "a.ini [training]: unknown key 'epochs'"),
    Case("ini bad value", lambda w: ["--read-ini", w.file("a.ini", "[training]\nnum_epochs = many\n"),
                                     "--print-ini"],
         2, "a.ini [training] num_epochs: expected an integer, got 'many'"),
    Case("ini is /dev/zero", lambda w: ["--read-ini", "/dev/zero", "--print-ini"],
         2, "/dev/zero: not a regular file"),
    Case("ini is a directory", lambda w: ["--read-ini", w.dir("conf"), "--print-ini"], 2, "a directory"),
    Case("ini missing", lambda w: ["--read-ini", w.tmp / "none.ini", "--print-ini"],
         2, "no such config file"),
    Case("ini not UTF-8", lambda w: ["--read-ini", w.file("a.ini", b"[model]\n\xff\xfe\n"), "--print-ini"],
         2, "cannot read config file"),
    Case("ini over 1 MiB", lambda w: ["--read-ini", w.file("a.ini", "#" * (MIB + 1)), "--print-ini"],
         2, "too large for a config file"),
    Case("json not a mapping", lambda w: ["--read-ini", w.file("a.json", "[1, 2]"), "--print-ini"],
         2, "expected a mapping of sections"),
    Case("yaml invalid", lambda w: ["--read-ini", w.file("a.yaml", "model: [\n"), "--print-ini"],
         2, "not valid JSON/YAML"),
    Case("json unknown section", lambda w: ["--read-ini", w.file("a.json", '{"optim": {"x": 1}}'),
                                            "--print-ini"],
         2, "unknown section 'optim'"),
    # -- options ----------------------------------------------------------------------------------
    Case("unknown command", lambda w: ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    Case("unknown option", lambda w: ["train", "--bogus", w.train, w.model_dir],
         2, "unrecognized arguments: --bogus"),
    Case("threads -1", lambda w: ["train", "--threads", "-1", w.train, w.model_dir],
         2, "argument --threads: expected an integer >= 1, got -1"),
    Case("threads 0", lambda w: ["evaluate", "--threads", "0", w.model_pt, w.train],
         2, "argument --threads: expected an integer >= 1, got 0"),
    Case("threads not a number", lambda w: ["train", "--threads", "many", w.train, w.model_dir],
         2, "expected an integer >= 1, got 'many'"),
    Case("num-data-workers -1", lambda w: _train("--num-data-workers", "-1", w.train, w.model_dir),
         2, "argument --num-data-workers: expected an integer >= 0, got -1"),
    Case("train with 1 path", lambda w: _train(w.model_dir), 2, "got 1 paths"),
    Case("train with 4 paths", lambda w: _train(w.train, w.dev, w.dev, w.model_dir), 2, "got 4 paths"),
    Case("dev dir and dev proportion", lambda w: _train("--dev-proportion", "0.2", w.train, w.dev,
                                                        w.model_dir),
         2, "give DEV_DIR or --dev-proportion, not both"),
    # -- MODEL_DIR --------------------------------------------------------------------------------
    Case("forgotten MODEL_DIR: dev dir as model dir", lambda w: _train(w.train, w.copy(w.dev, "dev")),
         2, "is a Kaldi data dir (it holds feats.scp, utt2spk); was MODEL_DIR forgotten?"),
    Case("train dir as model dir", lambda w: _train(w.train, w.dev, w.train),
         2, "is a Kaldi data dir"),
    Case("model dir is a file", lambda w: _train(w.train, w.file("model.txt", "notes\n")),
         2, "model.txt is a file"),
    Case("model dir inside a file", lambda w: _train(w.train, w.file("model.txt", "x") / "model"),
         2, "is inside"),
    Case("model dir holds other things", lambda w: _train(w.train, w.file("mine/notes.txt", "x").parent),
         2, "is not empty (notes.txt) and holds no stagetune model"),
    Case("model dir trained with another config",
         lambda w: ["--set", "training.learning_rate=0.02", *_train(w.train, w.copy(w.model, "old"))],
         2, "holds a checkpoint trained with another config (training.learning_rate"),
    # -- data -------------------------------------------------------------------------------------
    Case("missing train dir", lambda w: _train(w.tmp / "nowhere", w.model_dir), 1, "does not exist"),
    Case("train dir is a file", lambda w: _train(w.file("train", "x"), w.model_dir),
         1, "does not exist or is not a directory"),
    Case("missing feats.scp", lambda w: _train(w.train_without("feats.scp"), w.model_dir),
         1, "feats.scp is missing"),
    Case("missing text", lambda w: _train(w.train_without("text"), w.model_dir), 1, "text"),
    Case("missing tokens.txt", lambda w: _train(w.train_without("tokens.txt"), w.model_dir),
         1, "tokens.txt"),
    Case("feats.scp line without a path", lambda w: _train(w.train_with("feats.scp", "spk0-u00\n"),
                                                           w.model_dir),
         1, "feats.scp line 1"),
    Case("feats.scp names a missing ark", lambda w: _train(
        w.train_with("feats.scp", f"spk0-u00 {w.tmp}/none.ark:12\n"), w.model_dir), 1, "none.ark"),
    Case("token not in tokens.txt", lambda w: _train(
        w.train_with("text", (w.train / "text").read_text().replace(" A", " Z", 1)), w.model_dir),
         1, "'Z'"),
    Case("dev features of another dimension", lambda w: _train(w.train, w.dev_wide, w.model_dir),
         2, "features have dimension 16 but"),
    Case("dev transcripts all empty", lambda w: _train(w.train, w.dev_empty, w.model_dir),
         1, "all 20 transcripts are empty, so no dev error can be measured"),
    Case("missing dev dir", lambda w: _train(w.train, w.tmp / "nodev", w.model_dir), 1, "does not exist"),
    Case("dev proportion above 1", lambda w: _train("--dev-proportion", "1.5", w.train, w.model_dir),
         1, "dev proportion must be in (0, 1), got 1.5"),
    Case("dev proportion 0", lambda w: _train("--dev-proportion", "0", w.train, w.model_dir),
         1, "dev proportion must be in (0, 1), got 0.0"),
    Case("dev proportion leaving no dev", lambda w: _train("--dev-proportion", "0.0001", w.train,
                                                           w.model_dir),
         1, "leaves the dev set empty"),
    Case("speaker normalization without cmvn.scp",
         lambda w: ["--set", "data.normalization=speaker", *_train(w.train, w.model_dir)],
         1, "cmvn.scp is missing"),
    Case("frame task without utt2label",
         lambda w: ["--set", "model.task=frame", *_train(w.train, w.model_dir)], 1, "utt2label"),
    Case("missing --init-from", lambda w: _train("--init-from", w.tmp / "none.pt", w.train, w.model_dir),
         1, "no such model file"),
    Case("--init-from not a model", lambda w: _train("--init-from", w.file("junk.pt", b"junk"), w.train,
                                                     w.model_dir),
         1, "junk.pt"),
    # -- evaluate ---------------------------------------------------------------------------------
    Case("evaluate --out is a directory", lambda w: ["evaluate", "--threads", "1", "--out", w.dir("hyps"),
                                                     w.model_pt, w.train],
         2, "is a directory; name a file"),
    Case("evaluate missing model", lambda w: ["evaluate", w.tmp / "model.pt", w.train],
         1, "no such model file"),
    Case("evaluate junk model", lambda w: ["evaluate", w.file("model.pt", b"junk"), w.train], 1, "model.pt"),
    Case("evaluate missing data dir", lambda w: ["evaluate", w.model_pt, w.tmp / "nowhere"],
         1, "does not exist"),
    Case("evaluate other feature dimension", lambda w: ["evaluate", w.model_pt, w.dev_wide],
         2, "features have dimension 16, the model expects 8"),
    Case("evaluate batch size 0", lambda w: ["evaluate", "--batch-size", "0", w.model_pt, w.train],
         2, "--batch-size >= 1"),
    Case("evaluate negative beam", lambda w: ["evaluate", "--beam-width", "-1", w.model_pt, w.train],
         2, "--beam-width must be >= 0"),
    # -- prep -------------------------------------------------------------------------------------
    Case("prep too many mel bins", lambda w: ["prep", "--num-mel-bins", "500", w.copy(w.wavs, "wavs")],
         2, "--num-mel-bins 500 is too many for 8000 Hz audio in 25 ms frames"),
    Case("prep too few mel bins", lambda w: ["prep", "--num-mel-bins", "2", w.copy(w.wavs, "wavs")],
         2, "num_mel_bins must be >= 3, got 2"),
    Case("prep negative dither", lambda w: ["prep", "--dither", "-1", w.copy(w.wavs, "wavs")],
         2, "dither must be >= 0"),
    Case("prep shift beyond length", lambda w: ["prep", "--frame-shift-ms", "30", w.copy(w.wavs, "wavs")],
         2, "frame shift must be in (0, frame length]"),
    Case("prep other sample rate", lambda w: ["prep", "--sample-rate", "16000", w.copy(w.wavs, "wavs")],
         1, "16000"),
    Case("prep missing dir", lambda w: ["prep", w.tmp / "nowhere"], 1, "does not exist"),
    Case("prep without wav.scp", lambda w: ["prep", w.dir("empty")], 1, "no wav.scp"),
    Case("prep wav.scp names a missing wav", lambda w: ["prep", w.file("d/wav.scp", "u1 /no/such.wav\n").parent],
         1, "wav.scp line 1"),
    Case("prep wav that is not audio", lambda w: [
        "prep", w.file("d/wav.scp", f"u1 {w.file('d/u1.wav', b'not a wav at all')}\n").parent],
         1, "wav.scp line 1"),
    # -- optim ------------------------------------------------------------------------------------
    Case("optim without command", lambda w: ["optim", w.url], 2, "optim needs a command"),
    Case("run --timeout -5", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--timeout", "-5"],
         2, "argument --timeout: expected a finite number > 0, got -5"),
    Case("run --timeout 0", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--timeout", "0"],
         2, "argument --timeout"),
    Case("run --timeout nan", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--timeout", "nan"],
         2, "argument --timeout"),
    Case("run --workers 0", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--workers", "0"],
         2, "--workers must be >= 1"),
    Case("run --n-trials -1", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--n-trials", "-1"],
         2, "--n-trials must be >= 0"),
    Case("run unknown sampler", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--sampler", "x"],
         2, "--sampler 'x': choose one of"),
    Case("run --heartbeat-interval 0", lambda w: ["optim", "--study-name", STUDY, w.url, "run",
                                                  "--heartbeat-interval", "0"],
         2, "argument --heartbeat-interval"),
    Case("run --num-data-workers -1", lambda w: ["optim", "--study-name", STUDY, w.url, "run",
                                                 "--num-data-workers", "-1"],
         2, "argument --num-data-workers"),
    Case("best into a directory", lambda w: ["optim", "--study-name", STUDY, w.url, "best", w.dir("out")],
         2, "is a directory; name a file, e.g."),
    Case("important into a directory", lambda w: ["optim", "--study-name", STUDY, w.url, "important",
                                                  w.dir("out")],
         2, "is a directory"),
    Case("best --format xml", lambda w: ["optim", "--study-name", STUDY, w.url, "best", "--format", "xml"],
         2, "invalid choice: 'xml'"),
    Case("important --top-k and --threshold", lambda w: ["optim", "--study-name", STUDY, w.url, "important",
                                                         "--top-k", "1", "--threshold", "0.1"],
         2, "not allowed with argument"),
    Case("status of a missing database", lambda w: ["optim", f"sqlite:///{w.tmp}/none.db", "status"],
         1, "no study database at"),
    Case("status of a missing study", lambda w: ["optim", "--study-name", "nope", w.url, "status"],
         1, "nope"),
    Case("unsupported database", lambda w: ["optim", "foo://host/db", "status"], 1, "unsupported database 'foo'"),
    Case("unparsable URL", lambda w: ["optim", "not a url", "status"], 1, "cannot parse storage URL"),
    Case("init --num-trials 0", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                           "--num-trials", "0"],
         2, "--num-trials must be >= 1, got 0"),
    Case("init unknown pruner", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                           "--pruner", "bogus"],
         2, "--pruner 'bogus'"),
    Case("init unknown metric", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                           "--metric", "bogus"],
         2, "--metric 'bogus'"),
    Case("init bad whitelist regex", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                                "--whitelist", "["],
         2, "is not a regular expression"),
    Case("init --mem-limit-bytes 0", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                                "--mem-limit-bytes", "0"],
         2, "--mem-limit-bytes must be >= 1"),
    Case("init --num-data-workers -1", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                                  "--num-data-workers", "-1"],
         2, "argument --num-data-workers"),
    Case("init missing train dir", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.tmp / "nowhere"],
         1, "does not exist"),
    Case("init without train dir", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init"],
         2, "init needs TRAIN_DIR"),
    Case("init --top-k without --from-study", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init",
                                                         w.train, "--top-k", "2"],
         2, "go with --from-study"),
    Case("init --from-study in a missing database", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init",
                                                               "--from-study", STUDY],
         1, "no study database at"),
    Case("init dev dir and dev proportion", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", w.train,
                                                       "--dev-dir", w.dev, "--dev-proportion", "0.1"],
         2, "not allowed with argument"),
    Case("run --gpus with --device cpu", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--gpus", "0,1"],
         2, "--gpus 0,1 gives each worker a GPU, but --device cpu is no GPU; drop --gpus, or give --device cuda"),
    Case("run --gpus without ids", lambda w: ["optim", "--study-name", STUDY, w.url, "run", "--gpus", ","],
         2, "--gpus ',': expected comma-separated GPU ids"),
    # -- global options where they do nothing, or after the command -----------------------------
    Case("--set before optim run", lambda w: ["--set", "training.num_epochs=3", "optim", "--study-name", STUDY,
                                              w.url, "run"],
         2, "--set has no effect on optim run: a study's configuration is the one optim init stored; "
            "--set goes with train, optim init or optim best"),
    Case("--set after optim status", lambda w: ["optim", "--study-name", STUDY, w.url, "status",
                                                "--set", "training.num_epochs=3"],
         2, "--set has no effect on optim status"),
    Case("--read-ini before optim important", lambda w: ["--read-ini", w.file("a.ini", "[training]\n"), "optim",
                                                         "--study-name", STUDY, w.url, "important"],
         2, "--read-ini has no effect on optim important"),
    Case("--read-ini before optim best", lambda w: ["--read-ini", w.file("a.ini", "[training]\n"), "optim",
                                                    "--study-name", STUDY, w.url, "best"],
         2, "--read-ini has no effect on optim best: its output is the best trial's configuration"),
    Case("--set before evaluate", lambda w: ["--set", "training.num_epochs=3", "evaluate", w.model_pt, w.train],
         2, "--set has no effect on evaluate: MODEL_PT holds the configuration it was trained with"),
    Case("--read-ini after prep", lambda w: ["prep", w.copy(w.wavs, "wavs"), "--read-ini", w.file("a.ini", "")],
         2, "--read-ini has no effect on prep"),
    Case("--set after train is read", lambda w: ["train", "--threads", "1", w.train, w.model_dir,
                                                 "--set", "training.epochs=3"],
         2, "unknown parameter 'training.epochs'"),
    # -- study names ----------------------------------------------------------------------------
    Case("empty study name", lambda w: ["optim", "--study-name", "", w.url, "status"],
         2, "--study-name is empty"),
    Case("study name with a path", lambda w: ["optim", "--study-name", "a/b/../c", w.url, "run"],
         2, "--study-name 'a/b/../c' holds a path separator; a study name also names its checkpoint directory"),
    Case("study name ..", lambda w: ["optim", "--study-name", "..", f"sqlite:///{w.tmp}/new.db", "init", w.train],
         2, "--study-name '..' is not a name"),
    Case("study name with a backslash", lambda w: ["optim", "--study-name", "a\\b", w.url, "important"],
         2, "holds a path separator"),
    Case("study name with a control character", lambda w: ["optim", "--study-name", "a\tb", w.url, "best"],
         2, "--study-name 'a\\tb' holds a control character"),
    Case("empty --from-study", lambda w: ["optim", f"sqlite:///{w.tmp}/new.db", "init", "--from-study", ""],
         2, "--from-study is empty"),
    Case("init again with other settings", lambda w: [*sets(*SMALL), "optim", "--study-name", STUDY, w.url,
                                                      "init", w.train, "--num-trials", "99"],
         2, "exists with other settings"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(world: World, tmp_path: Path, case: Case) -> None:
    w = replace(world, tmp=tmp_path)
    argv = case.argv(w)
    before_world, before_case = snapshot(world.root), snapshot(tmp_path)
    result = stagetune(world.root, *argv)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stagetune: error: "), result.stderr
    assert case.expected in lines[0]
    assert result.returncode == case.exit_code, result.stderr
    assert result.stdout == ""
    assert snapshot(tmp_path) == before_case
    assert snapshot(world.root) == before_world
    assert not w.model_dir.exists()
    assert not [p for root in (tmp_path, world.root) for p in root.rglob("*.tmp*")]


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 100
    assert len({case.id for case in CASES}) == len(CASES)
