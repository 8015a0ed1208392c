"""Host-side work between compiled calls, as actions of one small interface: the built-in duties and the user's own.

The controller (fit.py) runs a chunk of steps in one compiled call, then calls every action's
`on_chunk_end(ctx, step, arrays)` in order: `step` is the number of steps done, `arrays` the chunk's per-step
values. An action that returns True ends training after this round. This is Orbit's Controller with
`train_actions`, without its class hierarchy. Users add theirs with `trainer.callbacks: [{_target_: ...}]`
(README: Callbacks; examples/my_callbacks.py).

The order of one round, and why:
    MetricHandoff      first: the chunk's points reach the sink before anything logged at its step
    AutoStepsPerLoop   trainer.steps_per_loop=null: times the second call and sets the chunk length
    <user callbacks>   before validation: a stop they ask for makes this step the run's last, and the last
                       step's val/* come from the final evaluation, once
    Validation         every eval_every steps, never at the last step; early stopping
    Checkpointing      every checkpoint_every steps and at the last round (the end, any stop, a signal): after
                       every action that logs, so the barrier behind the save covers their points
    ProgressBar        last
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.callbacks import HOOKS, Callback, Context, Result, StepArrays
from trainer.cli import notice_console
from trainer.config import TrainerError, build
from trainer.loop import MAX_ROWS, StepLoop
from trainer.metrics import Metrics

if TYPE_CHECKING:
    from trainer.checkpoint import Checkpoints

console = notice_console()

CHUNK_SECONDS = 0.2  # auto steps_per_loop aims at calls this long: a live progress bar, negligible overhead


def build_callbacks(nodes: Sequence[DictConfig]) -> list[Callback]:
    """The user's `trainer.callbacks`, built (their targets were checked importable by config.check)."""
    built = []
    for i, node in enumerate(nodes):
        callback = build(node)
        missing = [hook for hook in HOOKS if not callable(getattr(callback, hook, None))]
        if missing:
            raise TrainerError(
                f"trainer.callbacks[{i}]._target_={node._target_!r} is not a callback: it has no "
                f"{', '.join(missing)}; subclass trainer.callbacks.Callback"
            )
        every = getattr(callback, "every", None)
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise TrainerError(f"trainer.callbacks[{i}].every={every!r} is invalid: expected an integer >= 1, "
                               "or null for wherever chunks end")  # fmt: skip
        built.append(callback)
    return built


# --- the built-in actions ------------------------------------------------------------------------------
class MetricHandoff(Callback):
    """Hands the chunk's device tensors to the run's sink, whose thread copies and writes them."""

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        if arrays.steps:
            from trainer.tracking import Chunk

            ctx.run.sink.submit(Chunk(arrays.first_step, arrays.tensors, arrays.names, arrays.t_start, arrays.t_end))


class AutoStepsPerLoop(Callback):
    """Steps per call such that one call lasts about CHUNK_SECONDS, from the time of the second call (the
    first includes the trace); one host sync, once."""

    def __init__(self) -> None:
        self.calls, self.t_first = 0, 0.0

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        self.calls += 1
        if self.calls == 1:
            self.t_first = time.perf_counter()
        elif self.calls == 2:
            arrays["train/loss"]  # wait for the chunk so the time is real
            per_step = (time.perf_counter() - self.t_first) / arrays.steps
            ctx.steps_per_loop = int(np.clip(CHUNK_SECONDS / max(per_step, 1e-6), 1, MAX_ROWS))


@dataclass
class EarlyStopper:
    """Tracks the monitored validation metric; says when `patience` evaluations brought no improvement."""

    monitor: str
    patience: int
    min_delta: float
    restore_best: bool = True  # keep a host copy of the best weights, for the end of the run
    best: float = float("inf")
    best_step: int = -1
    waited: int = 0
    weights: list[np.ndarray] = field(default_factory=list)

    @property
    def sign(self) -> float:
        return -1.0 if any(word in self.monitor for word in MAXIMISED) else 1.0

    def should_stop(self, step: int, metrics: dict[str, float], model) -> bool:
        value = self.sign * metrics[self.monitor.removeprefix("val/")]
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.waited = value, step, 0
            if self.restore_best:
                self.weights = [v.numpy() for v in model.weights]  # a host copy, only on improvement
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self, model) -> None:
        for v, w in zip(model.weights, self.weights, strict=True):
            v.assign(w)


MAXIMISED = ("acc", "auc", "precision", "recall")  # in a monitored metric's name: higher is better


class Validation(Callback):
    """The validation split's loss (and accuracy) every `every` steps as val/*, with early stopping.

    Never at the run's last step: the final evaluation (fit._finish) logs that one, so each val/* key has one
    point per step. An early stop makes its step the last: its evaluation is not logged here either; the
    final one is, of the weights the run ends with (the best, with restore_best).
    """

    def __init__(self, loop: StepLoop, x, y, metrics: Metrics, every: int | None,
                 stopper: EarlyStopper | None = None):  # fmt: skip
        """`x`, `y`: the split's raw arrays (held in memory), or `x` its Stream and `y` None (streamed data)."""
        self.loop, self.x, self.y, self.metrics = loop, x, y, metrics
        self.every, self.stopper = every, stopper

    def evaluate(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.loop.evaluate(self.x, self.y, self.metrics).items()}  # host sync

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> bool:
        if not self.every or step % self.every or ctx.finishing:
            return False
        ctx.val, ctx.val_step = self.evaluate(), step
        stop = self.stopper is not None and self.stopper.should_stop(step, ctx.val, ctx.model)
        if stop:
            ctx.run.set_tag("early_stopped_at", str(step))
        if not stop or ctx.signum:  # an early stop's step is logged by the final evaluation (a signal has none)
            ctx.log(step, {f"val/{k}": v for k, v in ctx.val.items()})
        return stop


class Checkpointing(Callback):
    """Every `every` steps and at the last round: save, then send the sink a barrier, so the checkpoint
    becomes resumable once the store holds every point before it (checkpoint.Checkpoints)."""

    def __init__(self, checkpoints: Checkpoints, every: int | None):
        self.checkpoints, self.every = checkpoints, every

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        if ctx.stopping or (self.every and step % self.every == 0):
            self.checkpoints.save(step)
            ctx.run.sink.barrier(step)


class ProgressBar(Callback):
    """The console's progress bar (terminals only): steps done and the latest loss the sink has seen."""

    def __init__(self, enabled: bool):
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
            TimeRemainingColumn(), console=console, disable=not enabled,
        )  # fmt: skip
        self.live = False

    def on_train_begin(self, ctx: Context) -> None:
        self.task = self.bar.add_task("train", total=ctx.total_steps, completed=ctx.step, loss=float("nan"))
        self.bar.start()
        self.live = True

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        self.bar.update(self.task, completed=step, loss=ctx.run.sink.latest.get("train/loss", float("nan")))
        if ctx.stopping:
            self.on_train_end(ctx, None)

    def on_train_end(self, ctx: Context, result: Result | None) -> None:
        if self.live:
            self.bar.stop()
            self.live = False
