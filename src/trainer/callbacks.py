"""The one interface of the work between compiled calls, for the built-in actions and your own callbacks.

    class MyCallback(trainer.callbacks.Callback):
        def on_chunk_end(self, ctx, step, arrays):  # after each compiled call
            ctx.log(step, {"custom/last_loss": float(arrays["train/loss"][-1])})

Named in `trainer.callbacks: [{_target_: my_pkg.MyCallback, ...}]` (README: Callbacks; examples/my_callbacks.py).
The controller (fit.py) calls `on_chunk_end` of every action in turn after each call; the built-in duties are
actions of this same interface (actions.py). This module imports no TensorFlow: a callback module that
imports it fails, if it must, before TensorFlow starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HOOKS = ("on_train_begin", "on_chunk_end", "on_train_end")


@dataclass
class Result:
    """What a run's training ended with (fit returns it; on_train_end gets it, None when training broke)."""

    steps: int
    train_loss: float
    val: dict[str, float]
    steps_per_sec: float
    objective: float
    best_step: int | None = None


@dataclass
class Context:
    """What the actions of one run share. `log(step, metrics)` writes to the run's MLflow store, through the
    sink, in step order (nothing, on a multi-worker run's non-chief workers)."""

    model: Any
    run: Any  # tracking.Run, or QuietRun on non-chief workers
    total_steps: int
    step: int  # steps done
    steps_per_loop: int  # the longest next call (AutoStepsPerLoop sets it)
    val: dict[str, float] = field(default_factory=dict)  # the latest evaluation (`loss`, `accuracy`)
    val_step: int | None = None  # ... and the step it was taken at
    signum: int = 0  # a SIGINT/SIGTERM arrived before this round: training stops after it (the run is KILLED)
    stopped_by: str | None = None  # the action that asked to stop, once one has

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(step, metrics)

    @property
    def finishing(self) -> bool:
        """This round is the last and the final evaluation follows: the run's length is reached, or an action
        asked to stop (not a signal: an interrupted run is resumed, not finished)."""
        return not self.signum and (self.step >= self.total_steps or self.stopped_by is not None)

    @property
    def stopping(self) -> bool:
        """This round is the last one, for whatever reason."""
        return self.finishing or bool(self.signum)


class StepArrays(Mapping[str, np.ndarray]):
    """One chunk's per-step values by metric name: `train/loss`, `train/lr`, `train/grad_norm` (and
    `train/skipped_steps`) as [steps] arrays, `train/grad_norm_by_var/` as [steps, n_variables] with columns
    `names`; row i is step `first_step + i`.

    The compiled call leaves them on the device: each is copied to the host when first read, once per chunk
    (never per step), and not at all if no action reads it (the sink copies them off the training thread).
    """

    def __init__(self, first_step: int, tensors: dict[str, Any], names: Sequence[str], steps: int,
                 t_start: float = 0.0, t_end: float = 0.0):  # fmt: skip
        self.first_step, self.tensors, self.names, self.steps = first_step, tensors, names, steps
        self.t_start, self.t_end = t_start, t_end
        self._host: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._host:
            self._host[key] = np.asarray(self.tensors[key])  # host sync: waits for the chunk, once
        return self._host[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


class Callback:
    """The one interface of the work between compiled calls. Subclass it and override what you need.

    `every`: chunks also end on its multiples (as they do on eval_every and checkpoint_every), so
    `on_chunk_end` sees exactly those steps among the others; None: wherever chunks end.
    """

    every: int | None = None

    def on_train_begin(self, ctx: Context) -> None:
        """Before the first call; ctx.step is where training starts (a resumed run's checkpoint step)."""

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> bool | None:
        """After each call: `step` steps are done, `arrays` holds the chunk's. Return True to stop here."""
        return None

    def on_train_end(self, ctx: Context, result: Result | None) -> None:
        """Once, however training ended: `result` after the final evaluation; None after an error or a signal."""
