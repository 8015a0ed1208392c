"""scripts/bench.py runs end to end: one smoke run of `--quick --jobs tape`, no timing asserted."""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_bench_sink_counts_every_point(tmp_path: Path) -> None:
    """--sink: both arms per grad-norm mode ran, and the store holds exactly the points each logged."""
    steps = 60
    out = tmp_path / "sink.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sink", "--jobs", "tape", "--steps", str(steps), "--repeats", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = json.loads(out.read_text())["sink"]["arms"]
    # the tape example has two variables (w, b): loss, lr, global norm, and per_variable adds 2 more a step
    assert arms["global"]["points"] >= 3 * steps
    assert arms["per_variable"]["points"] - arms["global"]["points"] == 2 * steps
    for arm in arms.values():
        assert arm["points_quiet"] < arm["points"] / 10  # log_every=steps: one step's points and the summary
        assert len(arm["overhead"]) == 1
    assert "what the store adds" in proc.stdout
