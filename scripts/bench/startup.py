"""Start-up as a user meets it: a fresh `python -m trainer` against a fresh `import tensorflow`, interleaved.

The CLI's time is launch to step 0 done, read from the store: with one step per chunk the sink stamps step 0
with the time its compiled call returned (tracing included). The store exists already, as it does after a
first run. `import tensorflow`'s is launch to the child's clock after the import: both are wall clocks of
the same machine, both children get the same environment, so their difference is what the trainer adds.
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

from bench.harness import OURS_OVERRIDES, BenchError, JobContext, finite_median, new_store

CLI_STEPS = 3
IMPORT_TF = "import time; import tensorflow; print(time.time())"
KINDS = ("import_tf", "cli")


@dataclass
class Launch:
    """One fresh child process: when it was launched, and how to read the moment it reached its mark."""

    kind: str  # import_tf | cli
    proc: subprocess.Popen
    t0: float
    log: Path
    mark: Callable[[], float]  # the wall-clock time of its mark, read once it has exited

    def wait(self) -> tuple[float, float]:
        """(seconds from launch to the mark, its own peak RSS in MB: wait4 reads this child's rusage)."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if self.proc.returncode != 0:
            raise BenchError(f"{self.kind} child failed ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        return self.mark() - self.t0, usage.ru_maxrss / 1024


def launch(ctx: JobContext, kind: str) -> Launch:
    """Starts `kind` now; the CLI gets a fresh store made before its clock starts."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    if kind == "import_tf":
        where = Path(tempfile.mkdtemp(dir=ctx.workdir))
        command = [sys.executable, "-c", IMPORT_TF]
        mark = partial(child_clock, where / "stdout")
    else:
        store = new_store(ctx.workdir)
        where = store.dir
        overrides = [*ctx.job.overrides.split(), *OURS_OVERRIDES, f"tracking.uri={store.uri}"]
        overrides += [f"hydra.run.dir={store.dir / 'hydra'}", f"trainer.max_steps={CLI_STEPS}"]
        command = [sys.executable, "-m", "trainer", *overrides, "trainer.steps_per_loop=1"]
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
