"""scripts/bench.py runs end to end: one smoke run of `--quick --jobs tape`, no timing asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_quick_prints_every_competitor(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--jobs", "tape", "--json", str(tmp_path / "bench.json")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,  # anything it writes by mistake lands here, not in the repo
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("naive", "keras-fit", "bare", "ours"):
        assert name in proc.stdout, proc.stdout
    assert (tmp_path / "bench.json").is_file()
