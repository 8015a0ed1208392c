"""The controller: cuts training into compiled chunks and runs the actions between them.

Everything that needs the host happens only between chunks, as in Orbit's Controller: the controller runs a
call, checks it (the steps it ran, non-finite steps), then calls each action (trainer/actions.py: sink
hand-off, steps-per-loop choice, the user's callbacks, validation and early stopping, checkpoints, progress)
with the step and the chunk's per-step arrays. Chunk boundaries are placed on every action's `every`
(eval_every, checkpoint_every, a callback's own), so those happen at exactly the configured steps.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence

from omegaconf import DictConfig

from trainer.actions import (
    AutoStepsPerLoop,
    Checkpointing,
    EarlyStopper,
    MetricHandoff,
    ProgressBar,
    Validation,
    console,
)
from trainer.callbacks import Callback, Context, Result, StepArrays
from trainer.checkpoint import Checkpoints
from trainer.config import TrainerError
from trainer.data import Dataset
from trainer.loop import StepLoop
from trainer.metrics import Metrics, default_metrics
from trainer.process import StopFlag
from trainer.profile import Profiler
from trainer.tracking import Run

__all__ = ["Interrupted", "Result", "fit"]

FIRST_CHUNKS = 10  # auto: the first two calls run this many steps; the second one is timed
MULTI_WORKER_STEPS_PER_LOOP = 100


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after the current chunk finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, directory: str):
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint in {directory}")
        self.signum, self.step, self.directory = signum, step, directory


def fit(
    loop: StepLoop,
    data: Dataset,
    run: Run,
    t: DictConfig,
    total_steps: int,
    checkpoints: Checkpoints,
    start: int = 0,
    callbacks: Sequence[Callback] = (),
    stop: StopFlag | None = None,
) -> Result:
    """Train from step `start` to `total_steps` (or an earlier stop), then evaluate; `stop` is the flag
    process.process_settings hands out (None: signals are not caught)."""
    lockstep = t.strategy == "multi_worker"  # workers must cut chunks alike: no timing-based choice
    k = t.steps_per_loop or (MULTI_WORKER_STEPS_PER_LOOP if lockstep else FIRST_CHUNKS)
    ctx = Context(loop.model, run, total_steps, start, k)
    validation = _validation(loop, data, t, val_metrics(t, data))
    actions = _actions(t, checkpoints, validation, callbacks, auto=t.steps_per_loop is None and not lockstep)
    if t.get("profile"):  # before the hand-off: a trace ends with the chunk that reached STOP
        actions.insert(0, Profiler(*t.profile, checkpoints.directory.parent / "profile"))
    stop = stop or StopFlag()
    result = None
    try:
        for action in actions:
            action.on_train_begin(ctx)
        with stop.catching():
            last, steps_per_sec = _train(loop, t, ctx, actions, checkpoints, stop)
        loop.input.release()  # before the final validation; the `finally` covers a run that raised
        if ctx.signum:
            raise Interrupted(ctx.signum, ctx.step, str(checkpoints.directory))
        if t.on_nonfinite == "skip_step":  # an early stop ran fewer steps: the fraction is of those run
            skipped = _check_skipped(loop, ctx.step, ctx.step, t.max_skipped_fraction, checkpoints)
            console.print(
                f"skipped {skipped} of {ctx.step} steps (non-finite loss or gradient; trainer.on_nonfinite=skip_step)"
            )
        result = _finish(loop, run, validation, ctx, last, steps_per_sec)
        return result
    finally:
        loop.input.release()
        for action in actions:
            action.on_train_end(ctx, result)


def _validation(loop: StepLoop, data: Dataset, t: DictConfig, metrics: Metrics) -> Validation | None:
    if not data.has_val:
        return None
    es = t.early_stopping
    stopper = EarlyStopper(es.monitor, es.patience, es.min_delta, es.restore_best) if es.patience else None
    split = (data.val, None) if data.streamed else (data.x_val, data.y_val)
    return Validation(loop, *split, metrics, t.eval_every, stopper)


def val_metrics(t: DictConfig, data: Dataset) -> Metrics:
    """trainer.val_metrics, or by the data's task when null (metrics.default_metrics)."""
    names = t.get("val_metrics")
    names = default_metrics(data.task) if names is None else list(names)
    return Metrics(names, data.task, sparse=data.task == "multiclass" and not data.one_hot)


def _actions(t: DictConfig, checkpoints: Checkpoints, validation: Validation | None, callbacks: Sequence[Callback],
             auto: bool) -> list[Callback]:  # fmt: skip
    """The round's order (actions.py says why): hand-off, steps per loop, the user's, validation, checkpoint,
    progress."""
    return [
        MetricHandoff(),
        *([AutoStepsPerLoop()] if auto else []),
        *callbacks,
        *([validation] if validation else []),
        Checkpointing(checkpoints, t.checkpoint_every),
        ProgressBar(t.progress and console.is_terminal),
    ]


def _train(loop: StepLoop, t: DictConfig, ctx: Context, actions: list[Callback], checkpoints: Checkpoints,
           stop: StopFlag) -> tuple[StepArrays | None, float]:  # fmt: skip
    """The chunks, each followed by one round of actions; returns the last chunk's arrays and the rate."""
    start = step = ctx.step
    calls, last = 0, None
    t_start = t_timed = time.perf_counter()
    step_timed = start
    while not ctx.stopping:
        n = min(ctx.steps_per_loop, ctx.total_steps - step, loop.call_limit(step),
                *(_until(step, getattr(a, "every", None), getattr(a, "boundaries", ())) for a in actions))  # fmt: skip
        t0 = time.time()
        out = loop.run(n)
        ran = n if t.on_nonfinite != "stop" else int(out["steps"])  # one scalar per chunk, not per step
        tensors = {key: v for key, v in out.items() if key.startswith("train/")}
        last = StepArrays(step, tensors, loop.variable_names, ran, t0, time.time())
        step = ctx.step = step + ran
        calls += 1
        if ran < n:  # the steps before the non-finite one are logged, then the run fails
            MetricHandoff().on_chunk_end(ctx, step, last)
            _raise_nonfinite(loop, step, loop.describe_nonfinite(out), checkpoints)
        if t.on_nonfinite == "skip_step":  # past the run's budget already: no need to train on to see it
            _check_skipped(loop, step, ctx.total_steps, t.max_skipped_fraction, checkpoints)
        if calls == 1:
            t_timed, step_timed = time.perf_counter(), step  # the rate is measured past the first call
        ctx.signum = stop.signum  # read once a round: a signal arriving during it counts from the next
        for action in actions:
            if action.on_chunk_end(ctx, step, last) and ctx.stopped_by is None:
                ctx.stopped_by = type(action).__qualname__
                ctx.run.set_tag("stopped_by", f"{ctx.stopped_by} at step {step}")
        loop.check_trainable(step)  # a callback's `trainable = ...` would otherwise change nothing, silently
    if step == step_timed:  # a single call: the rate includes the trace
        t_timed, step_timed = t_start, start
    return last, (step - step_timed) / max(time.perf_counter() - t_timed, 1e-9)


def _finish(loop: StepLoop, run: Run, validation: Validation | None, ctx: Context, last: StepArrays | None,
            steps_per_sec: float) -> Result:  # fmt: skip
    """Final evaluation (of the best weights if early stopping kept them) and summary metrics, at the last step.

    Its val/* are the last step's only point: validation never logs that step (actions.Validation). When the
    last step was evaluated already and the weights stayed (restore_best=false), that evaluation is reused.
    """
    step = ctx.step
    train_loss = float(last["train/loss"][-1]) if last is not None and last.steps else float("nan")  # once
    summary: dict[str, float] = {"perf/steps_per_sec": steps_per_sec}
    stopper = validation.stopper if validation else None
    best_step, restored = None, False
    if stopper and stopper.best_step >= 0:
        best_step = stopper.best_step
        summary["early_stopping/best_step"] = best_step
        if stopper.restore_best:
            stopper.restore(loop.model)
            restored = True
    averaged = not restored and loop.use_averages()  # optimizer.use_ema: the weights become their averages
    if averaged:
        run.set_tag("weights", "moving average (optimizer.use_ema)")
    from trainer.objective import FALLBACK, objective_key  # val/loss, else train/final_loss: the rule's one home

    if validation is not None:
        val = ctx.val if ctx.val_step == step and not (restored or averaged) else validation.evaluate()
        summary.update({f"val/{k}": v for k, v in val.items()})
    else:  # no held-out split: the objective is the loss over the whole training set
        val, summary[FALLBACK] = {}, float(loop.evaluate()["loss"])
    objective = summary[objective_key(summary)]
    run.log(step, summary)
    return Result(step, train_loss, val, steps_per_sec, objective, best_step)


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


def _raise_nonfinite(loop: StepLoop, step: int, where: str, checkpoints: Checkpoints) -> None:
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


def _until(step: int, every: int | None, boundaries: Sequence[int] = ()) -> int:
    """Steps to the next multiple of `every`, or of the next of `boundaries` (absolute steps: the profiler's)."""
    ahead = [b - step for b in boundaries if b > step]
    return min([every - step % every if every else 1 << 62, *ahead])
