"""`trainer.profile=[START,STOP]`: a tf.profiler trace of global steps START..STOP, logged as the run's `profile/`.

An action like the others (actions.py): its `boundaries` make the controller end a chunk exactly at START and at
STOP (fit._until), so the trace holds whole compiled calls of exactly those steps and nothing is added per step.
tf.profiler.experimental.start at the round ending on START (or before the first call when START is where
training starts), stop at the round ending on STOP. TensorFlow writes `<logdir>/plugins/profile/<timestamp>/
<host>.xplane.pb`, the layout TensorBoard's profile plugin reads: `tensorboard --logdir <logdir>` with the
`tensorboard-plugin-profile` package (README: Profiler).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import tensorflow as tf

from trainer.callbacks import Callback, Context, StepArrays
from trainer.config import TrainerError

ARTIFACT_DIR = "profile"


def check_profile(profile: Any, total_steps: int) -> None:
    """STOP within the run: the range checks that need the run's length (the rest are in config.TrainerSettings)."""
    if profile is not None and profile[1] > total_steps:
        raise TrainerError(f"trainer.profile=[{profile[0]},{profile[1]}]: STOP is past the run's {total_steps} "
                           f"steps; use STOP <= {total_steps}, e.g. trainer.profile=[{max(total_steps - 10, 0)},"
                           f"{total_steps}]")  # fmt: skip


class Profiler(Callback):
    """Traces steps [start, stop) into `logdir`, then logs it as the run's artifact `profile/`."""

    def __init__(self, start: int, stop: int, logdir: Path):
        self.start, self.stop, self.logdir = start, stop, logdir
        self.boundaries = (start, stop)  # fit._until ends a chunk on each
        self.active = False
        self.lost = ""  # steps of the window a stopped attempt traced and lost (a resume inside the window)

    def on_train_begin(self, ctx: Context) -> None:
        """A resume inside the window (a kill -9 there: the trace in progress dies with the process) traces the
        rest of it, says so in one line and tags the steps lost. Before: the trace was lost without a word."""
        if ctx.step == self.start:
            self._begin()
        elif self.start < ctx.step < self.stop:
            self.lost = f"{self.start}..{ctx.step}"
            print(f"profile: resumed at step {ctx.step}, inside trainer.profile=[{self.start},{self.stop}]: tracing "
                  f"steps {ctx.step}..{self.stop}; the trace of steps {self.lost} was lost with the stopped attempt",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.start = ctx.step
            self._begin()

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        if self.active and (step >= self.stop or ctx.stopping):
            arrays["train/loss"]  # host sync, once: the chunk's ops have run before the trace ends
            self._end(ctx)
        elif step == self.start and not ctx.stopping:
            self._begin()

    def on_train_end(self, ctx: Context, result: Any) -> None:
        if self.active:  # an error or a signal mid-trace: keep what was traced
            self._end(ctx)

    def _begin(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        tf.profiler.experimental.start(str(self.logdir))
        self.active = True

    def _end(self, ctx: Context) -> None:
        tf.profiler.experimental.stop()
        self.active = False
        ctx.run.set_tag("profile.steps", f"{self.start}..{self.stop}")
        if self.lost:
            ctx.run.set_tag("profile.lost_steps", self.lost)
        for path in sorted(self.logdir.rglob("*")):  # plugins/profile/<timestamp>/<host>.xplane.pb
            if path.is_file():
                ctx.run.log_artifact(path, f"{ARTIFACT_DIR}/{path.parent.relative_to(self.logdir).as_posix()}")
