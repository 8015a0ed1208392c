"""The second program (`--sink`): what writing every step's points to the store adds to a run of ours.

Both arms run the same train(cfg) and compute every metric on the device, handing every chunk to the sink;
log_every=steps keeps one step of them, so the difference is the store's share: rows built, SQLite inserts
and index upkeep, the writer threads' CPU.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
from mlflow.tracking import MlflowClient

from bench.harness import BenchError, Job, Store, compose, log, new_store, timed
from trainer.train import train

SINK_STEPS = 20_000  # the default N: issue 3's "100,000 points into a 20,000-step run of (a)"
NORMS = ("global", "per_variable")


@dataclass
class SinkResult:
    """ours on one job, writing every step's points vs (almost) none; paired per repeat."""

    job: str
    steps: int
    repeats: int
    arms: dict[str, dict[str, Any]]  # grad-norm mode -> points written, seconds of each arm, overhead per pair


def measure_sink(job: Job, steps: int, repeats: int, workdir: Path) -> SinkResult:
    """Each repeat runs the four arms (two grad-norm modes, log_every 1 or steps) back to back, their order
    alternating; the overhead is the median over repeats of T(every step) / T(one step) - 1."""
    order = sorted((norms, every) for norms in NORMS for every in (1, steps))
    seconds: dict[tuple[str, int], list[float]] = {arm: [] for arm in order}
    points: dict[tuple[str, int], int] = {}
    log(f"sink: {job.name}, {steps} steps, {repeats} repeat(s), arms {order}")
    sink_run(job, max(steps // 20, 10), ("global", 1), workdir)  # first-call costs land on no clock
    for r in range(repeats):
        for arm in order if r % 2 == 0 else order[::-1]:
            seconds[arm].append(sink_run(job, steps, arm, workdir, points))
        log(f"  repeat {r + 1}: " + ", ".join(f"{n} every {e}: {seconds[n, e][-1]:.2f} s" for n, e in order))
    result = {}
    for norms in NORMS:
        on, off = seconds[norms, 1], seconds[norms, steps]
        pairs = [a / b - 1 for a, b in zip(on, off, strict=True)]
        result[norms] = {
            "points": points[norms, 1],
            "points_quiet": points[norms, steps],
            "seconds_every_step": on,
            "seconds_one_step": off,
            "overhead": pairs,
            "median_overhead": statistics.median(pairs),
        }
    return SinkResult(job.name, steps, repeats, result)


def sink_run(
    job: Job, steps: int, arm: tuple[str, int], workdir: Path, points: dict[tuple[str, int], int] | None = None
) -> float:
    """One train(cfg) on a fresh store; the seconds it took, and (into `points`) the rows the store holds."""
    norms, every = arm
    store = new_store(workdir)
    cfg = compose(job, steps, store.uri, [f"tracking.log_grad_norms={norms}", f"tracking.log_every={every}"])
    keras.backend.clear_session()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        seconds = timed(lambda: train(cfg, output_dir=store.dir))
    if points is not None:
        points[arm] = count_points(store, steps, every)
    return seconds


def count_points(store: Store, steps: int, every: int) -> int:
    """The sink's metric rows in the store's one run (system/ samples are MLflow's sampler's, not the sink's);
    every logged step must have its train/loss point."""
    client = MlflowClient(store.uri)
    (run,) = client.search_runs([store.experiment_id])
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    if logged != set(range(0, steps, every)):
        raise BenchError(f"{store.uri}: train/loss at {len(logged)} steps, expected every {every}-th of {steps}")
    with contextlib.closing(sqlite3.connect(store.dir / "mlflow.db")) as db:
        query = "SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key NOT LIKE 'system/%'"
        return db.execute(query, (run.info.run_id,)).fetchone()[0]
