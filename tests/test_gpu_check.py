"""``bench/gpu_check.py`` without CUDA: it says so, runs its CPU rows and skips the CUDA ones.

On a GPU machine the same script checks every CUDA path (docs/benchmarks.md has
its table); here it must run in seconds and end with exit status 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_skips_the_cuda_rows(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a machine with a GPU: the CPU path
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check: no CUDA device" in done.stdout
    table = json.loads(out.read_text())
    rows = table["rows"]
    by_check: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_check.setdefault(row["check"][:3], []).append(row)
    assert sorted(by_check) == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]
    assert not [r for r in rows if r["status"] == "FAIL"], rows
    for check in ("(c)", "(e)", "(f)"):  # CUDA only
        assert {r["status"] for r in by_check[check]} == {"skipped"}
    ran = [r for r in rows if r["status"] != "skipped"]
    assert {r["check"][:3] for r in ran} == {"(a)", "(b)", "(d)"}
    memory = [r for r in by_check["(a)"] if r["status"] != "skipped"]
    assert len(memory) >= 2 and all("est/check" in r["result"] for r in memory)
    # one table at the end: a line per row
    table_lines = done.stdout.split(table["header"])[-1].splitlines()
    assert sum(line.startswith(("(a)", "(b)", "(c)", "(d)", "(e)", "(f)")) for line in table_lines) == len(rows)


@pytest.mark.parametrize("name", ["gpu_check.py"])
def test_gpu_check_documents_every_check(name: str) -> None:
    doc = (REPO / "bench" / name).read_text(encoding="utf-8").split('"""')[1]
    for check in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)"):
        assert f"* {check}" in doc
