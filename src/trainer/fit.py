"""The controller: cuts training into compiled chunks and does the host-side work between them.

Everything that needs the host (handing metrics to the sink, validation, checkpoints, early stopping,
the progress bar, signals) happens only between chunks, as in Orbit's Controller. Chunk boundaries are
placed on evaluation and checkpoint steps, so those happen at exactly the configured steps.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainer.checkpoint import Checkpoints
from trainer.config import TrainerError, TrainerSettings
from trainer.data import Dataset
from trainer.loop import MAX_ROWS, StepLoop
from trainer.tracking import Chunk, Run

console = Console(stderr=True)

CHUNK_SECONDS = 0.2  # auto steps_per_loop aims at calls this long: a live progress bar, negligible overhead
FIRST_CHUNKS = 10  # auto: the first two calls run this many steps; the second one is timed
MULTI_WORKER_STEPS_PER_LOOP = 100
GIL_SWITCH_SECONDS = 2e-4


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the current chunk finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, directory: str):
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint in {directory}")
        self.signum, self.step, self.directory = signum, step, directory


@dataclass
class Result:
    steps: int
    train_loss: float
    val: dict[str, float]
    steps_per_sec: float
    objective: float
    best_step: int | None = None


@dataclass
class EarlyStopper:
    """Tracks the monitored validation metric; says when `patience` evaluations brought no improvement."""

    monitor: str
    patience: int
    min_delta: float
    best: float = float("inf")
    best_step: int = -1
    waited: int = 0
    weights: list[np.ndarray] = field(default_factory=list)

    @property
    def sign(self) -> float:
        return -1.0 if "acc" in self.monitor else 1.0  # accuracy-like metrics are maximised

    def should_stop(self, step: int, metrics: dict[str, float], model) -> bool:
        value = self.sign * metrics[self.monitor.removeprefix("val/")]
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.waited = value, step, 0
            self.weights = [v.numpy() for v in model.weights]  # a host copy, only on improvement
            return False
        self.waited += 1
        return self.waited >= self.patience

    def restore(self, model) -> None:
        for v, w in zip(model.weights, self.weights, strict=True):
            v.assign(w)


def fit(
    loop: StepLoop, data: Dataset, run: Run, t: DictConfig, total_steps: int, checkpoints: Checkpoints, start: int = 0
) -> Result:
    val = (tf.constant(data.x_val), tf.constant(data.y_val)) if data.x_val is not None else None
    accuracy = data.task != "regression"
    es = t.early_stopping
    stopper = EarlyStopper(es.monitor, es.patience, es.min_delta) if es.patience and val is not None else None
    lockstep = t.strategy == "multi_worker"  # workers must cut chunks alike: no timing-based choice
    k = t.steps_per_loop or (MULTI_WORKER_STEPS_PER_LOOP if lockstep else FIRST_CHUNKS)
    step, calls, last = start, 0, {}
    t_start = t_timed = time.perf_counter()
    step_timed = start
    with _stop_on_signals() as stop, _progress(t.progress and console.is_terminal) as bar, _prompt_gil():
        task = bar.add_task("train", total=total_steps, completed=start, loss=float("nan"))
        while step < total_steps and not stop.signum:
            n = min(k, total_steps - step, _until(step, t.eval_every), _until(step, t.checkpoint_every),
                    loop.call_limit(step))  # fmt: skip
            t0 = time.time()
            out = loop.run(n)
            ran = n if t.on_nonfinite != "stop" else int(out["steps"])  # one scalar per chunk, not per step
            last = {key: v for key, v in out.items() if key.startswith("train/")}
            if ran:
                run.sink.submit(Chunk(step, last, loop.variable_names, t0, time.time()))
            step, calls = step + ran, calls + 1
            if ran < n:
                _raise_nonfinite(loop, step, int(out["bad_variable"]), checkpoints)
            if t.on_nonfinite == "skip_step":  # past the run's budget already: no need to train on to see it
                _check_skipped(loop, step, total_steps, _max_skipped_fraction(t), checkpoints)
            if calls == 1:
                t_timed, step_timed = time.perf_counter(), step  # the rate is measured past the first call
            elif calls == 2 and t.steps_per_loop is None and not lockstep:
                k = _auto_steps_per_loop(last, n, t_timed)
            if val is not None and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                metrics = {key: float(v) for key, v in loop.evaluate(*val, accuracy).items()}  # host sync per eval
                run.log(step, {f"val/{key}": v for key, v in metrics.items()})
                if stopper and stopper.should_stop(step, metrics, loop.model):
                    run.set_tag("early_stopped_at", str(step))
                    break
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                _checkpoint(checkpoints, run, step)
            bar.update(task, completed=step, loss=run.sink.latest.get("train/loss", float("nan")))
        _checkpoint(checkpoints, run, step)
        if stop.signum:
            raise Interrupted(stop.signum, step, str(checkpoints.directory))
    if t.on_nonfinite == "skip_step":  # an early stop ran fewer steps: the fraction is of those run
        skipped = _check_skipped(loop, step, step, _max_skipped_fraction(t), checkpoints)
        console.print(
            f"skipped {skipped} of {step} steps (non-finite loss or gradient; trainer.on_nonfinite=skip_step)"
        )
    if step == step_timed:  # a single call: the rate includes the trace
        t_timed, step_timed = t_start, start
    steps_per_sec = (step - step_timed) / max(time.perf_counter() - t_timed, 1e-9)
    return _finish(loop, data, run, stopper, step, last, steps_per_sec)


def _finish(loop: StepLoop, data: Dataset, run: Run, stopper, step: int, last: dict, steps_per_sec: float) -> Result:
    """Final evaluation (after restoring the best weights if early stopping kept them) and summary metrics."""
    train_loss = float(last["train/loss"][-1]) if last else float("nan")  # host sync, once, at the end
    summary: dict[str, float] = {"perf/steps_per_sec": steps_per_sec}
    best_step = None
    if stopper and stopper.weights:
        stopper.restore(loop.model)
        best_step = stopper.best_step
        summary["early_stopping/best_step"] = best_step
    if data.x_val is not None:
        val = {k: float(v) for k, v in loop.evaluate(tf.constant(data.x_val), tf.constant(data.y_val),
                                                      data.task != "regression").items()}  # fmt: skip
        objective = val["loss"]
        summary.update({f"val/{k}": v for k, v in val.items()})
    else:  # no held-out split: the objective is the loss over the whole training set
        val, objective = {}, float(loop.evaluate(loop.x, loop.y)["loss"])
        summary["train/final_loss"] = objective
    run.log(step, summary)
    return Result(step, train_loss, val, steps_per_sec, objective, best_step)


def _checkpoint(checkpoints: Checkpoints, run: Run, step: int) -> None:
    """Save, then send the sink a barrier: the checkpoint becomes resumable once the store holds all before it."""
    checkpoints.save(step)
    run.sink.barrier(step)


def _max_skipped_fraction(t: DictConfig) -> float:
    """The key, or its schema default for a resumed run whose run.json was written before the key existed."""
    return t.get("max_skipped_fraction", TrainerSettings.max_skipped_fraction)


def _check_skipped(loop: StepLoop, done: int, of: int, fraction: float, checkpoints: Checkpoints) -> int:
    """skip_step: the steps skipped so far, failing once they are more than `fraction` of `of` steps.

    Without a bound, 1,997 skipped steps of 2,000 ended FINISHED. One scalar read per chunk (the chunk's
    host sync in this mode); `of` is the run's total while it trains, the steps run at its end.
    """
    skipped = int(loop.skipped.numpy())
    if skipped > fraction * of:
        raise TrainerError(
            f"{skipped} of {done} steps were skipped (non-finite loss or gradient): more than "
            f"trainer.max_skipped_fraction={fraction} of {of} steps. Steps before it are logged; {_kept(checkpoints)}; "
            "lower optimizer.lr, set trainer.clip_norm, or raise trainer.max_skipped_fraction"
        )
    return skipped


def _raise_nonfinite(loop: StepLoop, step: int, bad_variable: int, checkpoints: Checkpoints) -> None:
    where = f"; first non-finite gradient: {loop.variable_names[bad_variable]}" if bad_variable >= 0 else ""
    raise TrainerError(
        f"non-finite loss or gradient at step {step}{where}. Steps before it are logged; {_kept(checkpoints)}; "
        "lower optimizer.lr, set trainer.clip_norm, or trainer.on_nonfinite=skip_step"
    )


def _kept(checkpoints: Checkpoints) -> str:
    """What a resume would start from, as it is on disk: a run stopped before its first checkpoint has none
    (checkpoint_every is null by default: checkpoints at the end and on a signal only)."""
    steps = checkpoints.steps()
    if not steps:
        return "no checkpoint was written yet (trainer.checkpoint_every=N writes one every N steps)"
    return f"the newest checkpoint is at step {steps[-1]} (resume={checkpoints.directory.parent} continues from it)"


def _auto_steps_per_loop(last: dict[str, tf.Tensor], n: int, t_start: float) -> int:
    """Steps per call so that one call lasts about CHUNK_SECONDS; measured once (one host sync)."""
    np.asarray(last["train/loss"])  # wait for the chunk so the time is real
    per_step = (time.perf_counter() - t_start) / n
    return int(np.clip(CHUNK_SECONDS / max(per_step, 1e-6), 1, MAX_ROWS))


def _until(step: int, every: int | None) -> int:
    return every - step % every if every else 1 << 62


@contextmanager
def _prompt_gil() -> Iterator[None]:
    """While training, a thread waiting for the GIL gets it within 0.2 ms instead of Python's 5 ms.

    Between chunks the training thread needs the GIL for a few short stretches (the compiled call's
    return, one scalar, the hand-off to the sink) while the sink's threads run Python; at the default
    interval each stretch could wait up to 5 ms, measured as ~10% of a small model's steps/s.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, GIL_SWITCH_SECONDS))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@dataclass
class _StopFlag:
    signum: int = 0


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    """SIGINT/SIGTERM end the run at the next chunk boundary (checkpoint, flush, KILLED); a second one now."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        if flag.signum:
            raise KeyboardInterrupt
        flag.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: stopping after this chunk (again to stop now)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
        TimeRemainingColumn(), console=console, disable=not enabled,
    )  # fmt: skip
