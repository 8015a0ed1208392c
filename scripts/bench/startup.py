"""Start-up as a user meets it: fresh `python -m trainer` processes against fresh `import tensorflow`s, interleaved.

Two programs. The race's start-up column (`begin`): launch to step 0 done of a CLI run, read from the store:
with one step per chunk the sink stamps step 0 with the time its compiled call returned (tracing included).
`--launch` (`measure_launch`): a whole 1-step run as a user types it (`ONE_STEP`: the end-of-run plot on, the
model file off), launch to exit, and launch to step 0 as well. The store exists already, as it does after a
first run. `import tensorflow`'s times are launch to the child's clock after the import, and launch to its
exit: both are wall clocks of the same machine, both children get the same environment, so their difference
is what the trainer adds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from bench.harness import EXPERIMENT, OURS_OVERRIDES, BenchError, JobContext, finite_median, log, new_store

CLI_STEPS = 3
IMPORT_TF = "import time; import tensorflow; print(time.time())"
KINDS = ("import_tf", "cli")
# --launch: the 1-step run of a user (the plot drawn and logged, as by default), in the bench's experiment of a
# store made before the clock starts; and what it may take: at most `import tensorflow` + this, launch to exit.
ONE_STEP = ("model=linear", "trainer.max_steps=1", "tracking.log_model=false", f"tracking.experiment={EXPERIMENT}")
LAUNCH_KINDS = ("import_tf", "one_step")
ONE_STEP_MARGIN_S = 2.5


@dataclass
class Launch:
    """One fresh child process: when it was launched, and how to read the moment it reached its mark."""

    kind: str  # import_tf | cli | one_step
    proc: subprocess.Popen
    t0: float
    log: Path
    mark: Callable[[], float]  # the wall-clock time of its mark, read once it has exited

    def wait(self) -> tuple[float, float]:
        """(seconds from launch to the mark, its own peak RSS in MB: wait4 reads this child's rusage)."""
        done = self.wait_exit()
        return done.mark_s, done.peak_rss_mb

    def wait_exit(self) -> Exited:
        """Its times once it has exited; the exit's clock stops when wait4 returns, so only one child at a time
        measures it well."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        exited = time.time() - self.t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            raise BenchError(f"{self.kind} child failed ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        return Exited(self.mark() - self.t0, exited, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


@dataclass(frozen=True)
class Exited:
    """One child's figures: seconds from launch to its mark and to its exit, the CPU seconds it used (user +
    system, all its threads: less sensitive than wall time to other programs on the machine), peak RSS in MB."""

    mark_s: float
    exit_s: float
    cpu_s: float
    peak_rss_mb: float


def launch(ctx: JobContext, kind: str) -> Launch:
    """Starts `kind` now (the race's CLI gets the job's overrides and OURS_OVERRIDES)."""
    steps = [f"trainer.max_steps={CLI_STEPS}", "trainer.steps_per_loop=1"]
    return start(ctx.workdir, kind, [*ctx.job.overrides.split(), *OURS_OVERRIDES, *steps])


def start(workdir: Path, kind: str, overrides: list[str]) -> Launch:
    """Starts `kind` now: `import tensorflow`, or `python -m trainer *overrides` on a fresh store made before its
    clock starts."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    if kind == "import_tf":
        where = Path(tempfile.mkdtemp(dir=workdir))
        command = [sys.executable, "-c", IMPORT_TF]
        mark = partial(child_clock, where / "stdout")
    else:
        store = new_store(workdir)
        where = store.dir
        placed = [f"tracking.uri={store.uri}", f"hydra.run.dir={store.dir / 'hydra'}"]
        command = [sys.executable, "-m", "trainer", *overrides, *placed]
        mark = partial(step0_time, store.uri, store.experiment_id)
    with (where / "stdout").open("w") as out, (where / "stderr").open("w") as err:
        t0 = time.time()
        proc = subprocess.Popen(command, cwd=where, stdout=out, stderr=err, env=env)
    return Launch(kind, proc, t0, where / "stderr", mark)


def child_clock(stdout: Path) -> float:
    """The time.time() the import child printed right after `import tensorflow` returned."""
    return float(stdout.read_text().split()[-1])


def step0_time(uri: str, experiment_id: str) -> float:
    client = MlflowClient(uri)
    (run,) = client.search_runs([experiment_id])
    return min(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step).timestamp / 1000


def begin(ctx: JobContext, pairs: int, alongside: bool) -> Callable[[], dict[str, Any]]:
    """Runs the start-ups; call the result for their figures.

    Measured: `pairs` of each, now, one at a time with nothing else running, which goes first alternating.
    `alongside` (a smoke run): one of each, started now beside whatever comes next; the call waits for them.
    """
    if alongside:
        launches = [launch(ctx, kind) for kind in KINDS]
        return lambda: summary({x.kind: [x.wait()] for x in launches})
    runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    for r in range(pairs):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            runs[kind].append(launch(ctx, kind).wait())
    result = summary(runs)
    return lambda: result


def summary(runs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Medians of each kind's seconds to its mark; the CLI's peak RSS (its largest)."""
    seconds = {kind: [s for s, _ in runs[kind]] for kind in KINDS}
    return {
        "first_step_s": finite_median(seconds["cli"]),
        "import_tf_s": finite_median(seconds["import_tf"]),
        "peak_rss_mb": max(rss for _, rss in runs["cli"]),
        "first_step_runs": seconds["cli"],
        "import_tf_runs": seconds["import_tf"],
    }


# --- --launch: a whole 1-step run ------------------------------------------------------------------------
@dataclass
class LaunchResult:
    """Per kind, each child's seconds from launch to its mark (import done / step 0 done) and to its exit, and
    the CPU seconds it used."""

    overrides: list[str]
    pairs: int
    to_mark: dict[str, list[float]]
    to_exit: dict[str, list[float]]
    cpu: dict[str, list[float]]
    peak_rss_mb: float  # the 1-step runs' largest

    def median(self, kind: str, of: str = "to_exit") -> float:
        return finite_median(getattr(self, of)[kind])


def measure_launch(workdir: Path, pairs: int, extra: list[str]) -> LaunchResult:
    """`pairs` of (import tensorflow, a 1-step run), one child at a time, which goes first alternating."""
    overrides = [*ONE_STEP, *extra]
    result = LaunchResult(overrides, pairs, *({kind: [] for kind in LAUNCH_KINDS} for _ in range(3)), 0.0)
    for r in range(pairs):
        for kind in LAUNCH_KINDS if r % 2 == 0 else LAUNCH_KINDS[::-1]:
            done = start(workdir, kind, overrides).wait_exit()
            result.to_mark[kind].append(done.mark_s)
            result.to_exit[kind].append(done.exit_s)
            result.cpu[kind].append(done.cpu_s)
            if kind == "one_step":
                result.peak_rss_mb = max(result.peak_rss_mb, done.peak_rss_mb)
        log(f"  pair {r + 1}: " + ", ".join(f"{k} {result.to_exit[k][-1]:.2f} s" for k in LAUNCH_KINDS))
    return result
