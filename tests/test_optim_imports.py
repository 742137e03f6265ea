"""Which ``optim`` commands pay for importing torch (about 3 s per process).

Benchmark and test workers (``--objective quadratic``/``sleep``) and usage errors
must not: the machinery tests start hundreds of workers, and a user's typo
should be answered at once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from optim_helpers import create_study, write_speech_data

_PROBE = (
    "import sys\n"
    "from stagetune.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported', code)\n"
)


def _probe(args: list[object], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.stdout.strip().splitlines()[-1]


def test_fast_workers_and_usage_errors_never_import_torch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"),
                 whitelist=["training.learning_rate"], num_trials=2)
    assert _probe(["optim", url, "run", "--objective", "quadratic"], tmp_path) == "torch not imported 0"
    assert _probe(["optim", url, "status"], tmp_path) == "torch not imported 0"
    assert _probe(["optim", url, "init", tmp_path / "data", "--num-trials", "0"], tmp_path) == (
        "torch not imported 2"
    )
