"""A streamed table holds memory bounded by its batches, not by the file: one pass over a Parquet file of
2M rows x 33 float32 columns (288 MB, 4 row groups) through the reader's stream, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

PASS = """
import json, resource, sys
import tensorflow as tf
from trainer.data import parquet
sys.path.insert(0, sys.argv[2])
from conftest import option_kwargs
ex = parquet(**option_kwargs("data", "parquet", path=sys.argv[1], target="y", in_memory="false"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = sum(int(x.shape[0]) for x, _ in ex.read().batch(4096))
print(json.dumps({"rows": rows, "growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def _pass_growth(path: Path, row_groups: int) -> tuple[float, float]:
    """(file MB, MB one streamed pass over it adds to the peak RSS of a fresh process)."""
    rng = np.random.default_rng(0)
    writer = None
    for _ in range(row_groups):
        columns = {f"f{i}": rng.standard_normal(GROUP_ROWS).astype(np.float32) for i in range(32)}
        columns["y"] = columns["f0"] + columns["f1"]
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", PASS, str(path), tests], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == row_groups * GROUP_ROWS
    return path.stat().st_size / 2**20, result["growth_mb"]


GROUP_ROWS = 250_000


@pytest.mark.slow
def test_one_pass_over_a_streamed_parquet_file_holds_memory_bounded_whatever_its_size(tmp_path: Path) -> None:
    """Before: pyarrow's pre-buffering held every row group a pass visits, so a pass grew with the file (8M
    rows, 1.15 GB: the trainer peaked at 2,428 MB). Now pages are read unbuffered (the trainer: 1,171 MB): a file
    4x the size grows the peak by about the same (a constant ~270 MB here: tf.data and pyarrow's first use)."""
    small_mb, small_growth = _pass_growth(tmp_path / "small.parquet", 2)
    big_mb, big_growth = _pass_growth(tmp_path / "big.parquet", 8)
    print(f"one streamed pass: {small_mb:.0f} MB file +{small_growth:.0f} MB RSS, {big_mb:.0f} MB +{big_growth:.0f}")
    assert big_growth - small_growth < 0.2 * (big_mb - small_mb)
