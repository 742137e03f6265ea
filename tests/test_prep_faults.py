"""``stagetune prep`` when things go wrong underneath it: truncated wavs, SIGTERM, SIGKILL.

Each test uses real wav files and, where the user sees the outcome at the shell,
the real command in a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stagetune.audio import write_wav
from stagetune.errors import DataError
from stagetune.prep import prep_data_dir

RATE = 8000


def _data_dir(root: Path, num_utterances: int = 2) -> Path:
    """A data dir whose utterances all read one 1 s wav (8000 samples, 16,044 bytes)."""
    data = root / "data"
    data.mkdir()
    samples = np.random.default_rng(0).normal(0, 3000, RATE).astype(np.int16)
    write_wav(data / "a.wav", samples, RATE)
    (data / "wav.scp").write_text("".join(f"u{i:05d} a.wav\n" for i in range(num_utterances)))
    return data


def _files(data: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(data.iterdir())}


def _temp_files(data: Path) -> list[str]:
    return sorted(path.name for path in data.glob(".*.tmp-*"))


def _prep(data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stagetune", "prep", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _when_writing_features(process: subprocess.Popen[str], data: Path) -> None:
    """Wait until ``process`` has written its first feature matrix."""
    deadline = time.monotonic() + 60
    while not any(path.stat().st_size for path in data.glob(".feats.ark.tmp-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "prep never started writing features"
        time.sleep(0.005)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(("num_bytes", "holds"), [(1000, "478"), (1001, "478 and a half")])
def test_truncated_wav_is_one_error_line_and_nothing_changes(
    tmp_path: Path, num_bytes: int, holds: str
) -> None:
    data = _data_dir(tmp_path)
    prep_data_dir(data)
    before = _files(data)
    wav = data / "a.wav"
    assert len(before["a.wav"]) == 16044
    wav.write_bytes(before["a.wav"][:num_bytes])  # a cut-off copy: header still says 8000
    before["a.wav"] = wav.read_bytes()

    done = subprocess.run(
        [sys.executable, "-m", "stagetune", "prep", str(data)], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert done.stderr.startswith(f"stagetune: error: {data / 'wav.scp'} line 1: {wav}: ")
    assert f"truncated: its header says 8000 samples, the file holds {holds};" in done.stderr
    assert _files(data) == before  # the last good features are still there, nothing new


def test_sigterm_removes_temporary_files_and_exits_143(tmp_path: Path) -> None:
    data = _data_dir(tmp_path, num_utterances=5000)  # far longer than the test waits
    before = _files(data)
    process = _prep(data)
    _when_writing_features(process, data)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 143, stderr
    assert stderr.startswith("stagetune: error: prep stopped by SIGTERM;"), stderr
    assert stderr.count("\n") == 1 and stdout == ""
    assert _files(data) == before


def test_next_run_removes_what_a_killed_run_left_and_nothing_else(tmp_path: Path) -> None:
    data = _data_dir(tmp_path, num_utterances=5000)
    process = _prep(data)
    _when_writing_features(process, data)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    killed = _temp_files(data)
    assert any(name.startswith(f".feats.ark.tmp-{process.pid}") for name in killed)

    dead = _dead_pid()
    host = socket.gethostname()
    (data / f".cmvn.ark.tmp-{dead}").write_text("written by an older stagetune")
    kept = [
        f".feats.ark.tmp-{os.getpid()}",  # alive: this test
        f".feats.ark.tmp-{os.getpid()}@{host}",
        f".feats.scp.tmp-{dead}@another-host",  # cannot tell whether it is alive there
        f".notes.tmp-{dead}",  # not a name prep writes
        f"feats.ark.tmp-{dead}",
    ]
    for name in kept:
        (data / name).write_text("keep")
    (data / "wav.scp").write_text("u1 a.wav\n")
    done = subprocess.run(
        [sys.executable, "-m", "stagetune", "prep", str(data)], capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert f"removed {len(killed) + 1} temporary file(s) of killed runs" in done.stdout
    assert _temp_files(data) == sorted(name for name in kept if name.startswith("."))
    assert (data / kept[-1]).exists()


def test_truncation_is_checked_against_the_header(tmp_path: Path) -> None:
    data = _data_dir(tmp_path, num_utterances=1)
    whole = (data / "a.wav").read_bytes()
    (data / "a.wav").write_bytes(whole[:44])  # header only
    with pytest.raises(DataError, match="header says 8000 samples, the file holds 0;"):
        prep_data_dir(data)
    (data / "a.wav").write_bytes(whole + b"LIST\x04\x00\x00\x00abcd")  # a chunk after the data
    assert prep_data_dir(data).num_frames == 98
