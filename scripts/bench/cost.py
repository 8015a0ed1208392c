"""The fourth program (`--cost OVERRIDES`): what a setting costs a run of ours, as a ratio of steps/s.

Two arms run the same train(cfg), every step logged, on a fresh store each: the job as the bench runs it, and
the job with OVERRIDES. Each repeat runs both, their order alternating; the rate of a run is N over its whole
wall time (start-up included, as a user waits for it), and the cost is the median over repeats of the pairs'
rate ratio. E.g. `--cost tracking.system_metrics=false` (on by default: the ratio is with / without).
"""

from __future__ import annotations

import contextlib
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

import keras

from bench.harness import Job, compose, log, new_store, timed
from bench.sink import count_points
from trainer.train import train

COST_STEPS = 5000  # the default N: ~1-2 s of the mlp job's steps, long enough for a sampler thread to wake


@dataclass
class CostResult:
    """ours on one job with and without `overrides`, paired per repeat."""

    job: str
    steps: int
    overrides: list[str]
    seconds: dict[str, list[float]]  # "job" / "with overrides" -> wall seconds of each repeat
    points: dict[str, int]  # metric points each arm's run wrote
    ratios: list[float]  # per repeat: steps/s with the overrides / steps/s without them

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)


def measure_cost(job: Job, overrides: list[str], steps: int, repeats: int, workdir: Path) -> CostResult:
    arms = {"job": [], "with overrides": list(overrides)}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    points: dict[str, int] = {}
    log(f"cost: {job.name}, {steps} steps, {repeats} repeat(s), with and without {' '.join(overrides)}")
    cost_run(job, max(steps // 20, 10), [], workdir, {})  # first-call costs land on no clock
    for r in range(repeats):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            seconds[name].append(cost_run(job, steps, arms[name], workdir, points, name))
        log(f"  repeat {r + 1}: " + ", ".join(f"{name}: {seconds[name][-1]:.2f} s" for name in arms))
    ratios = [t_job / t_with for t_job, t_with in zip(seconds["job"], seconds["with overrides"], strict=True)]
    return CostResult(job.name, steps, list(overrides), seconds, points, ratios)


def cost_run(job: Job, steps: int, extra: list[str], workdir: Path, points: dict[str, int], arm: str = "") -> float:
    """One train(cfg) on a fresh store; its seconds. Every step's train/loss must have reached the store."""
    store = new_store(workdir)
    cfg = compose(job, steps, store.uri, extra)
    keras.backend.clear_session()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        seconds = timed(lambda: train(cfg, output_dir=store.dir))
    if arm:
        points[arm] = count_points(store, steps, int(cfg.tracking.log_every))
    return seconds
