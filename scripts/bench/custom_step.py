"""--step: a step of the user's kind (SAM), ours with every step's metrics logged against the same step
hand-written as a compiled loop that logs nothing.

Issue 22's target: ours at least STEP_FLOOR x the hand-written loop. Both run SAM (rho 0.05: a gradient, a
perturbation, a second gradient, the restore, Adam's update) on the mlp job's data, model, optimizer, batch
order and epoch-cut chunks; ours goes through the step contract (trainer.steps.SAM, its gradients through
Ops: the row of loss, lr and per-variable norms, the sink, a real SQLite store read back after each run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from bench.competitors import BARE_STEPS_PER_CALL, run_ours
from bench.harness import MLP, Competitor, Job, JobContext, compose, fresh_model, fresh_optimizer, log, timed
from bench.race import race
from bench.report import Check
from trainer.config import build
from trainer.data.prepare import load as load_data
from trainer.loop import MIN_EPOCH_FOR_CUTS, epoch_order

RHO = 0.05
STEP_FLOOR = 0.95
SAM_JOB = Job(
    "sam",
    f"{MLP} trainer.batch_size=256 optimizer=adam optimizer.lr=1e-3 step=sam step.rho={RHO}",
    6000,
    0,
    "SAM on the MLP 32-64-64-1, 65,536 rows, batch 256, Adam: two passes a step",
)
QUICK_STEP_STEPS = 200


@dataclass
class StepResult:
    job: str
    steps: int
    rates: dict[str, float]  # competitor -> median marginal steps/s
    repeats: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.rates["ours"] / self.rates["hand-written"]


def measure_step(steps: int, repeats: int, workdir: Path, warm_up: bool = True) -> StepResult:
    cfg = compose(SAM_JOB, steps, "sqlite:///unused.db")
    ctx = JobContext(SAM_JOB, cfg, load_data(cfg.data), workdir)
    small = max(steps // 5, 2)
    entered = [Competitor("hand-written", run_sam_loop, steps, small), Competitor("ours", run_ours, steps, small)]
    log(f"sam: {SAM_JOB.about}; N={steps}, {repeats} repeat(s)")
    if warm_up:
        for c in entered:
            c.run(ctx, small)
    race(ctx, entered, repeats, "step")
    return StepResult("sam", steps, {c.name: c.median() for c in entered}, {c.name: c.rates() for c in entered})


def report_step(result: StepResult) -> list[Check]:
    rates = ", ".join(f"{name} {rate:,.0f} steps/s" for name, rate in result.rates.items())
    print(f"\nstep job {result.job} (N={result.steps}): {rates}; ours / hand-written {result.ratio:.2f}x")
    return [Check(result.ratio >= STEP_FLOOR, True, f"sam: ours / hand-written {result.ratio:.2f}x >= {STEP_FLOOR}x")]


def run_sam_loop(ctx: JobContext, steps: int) -> float:
    return timed(lambda: sam_loop(ctx, steps))


def sam_loop(ctx: JobContext, steps: int) -> float:
    """SAM as a user would hand-write it: the bench's bare loop with SAM's step, no metrics, no store."""
    model, loss_fn = fresh_model(ctx), build(ctx.cfg.loss)
    optimizer = fresh_optimizer(ctx, steps)
    variables = model.trainable_variables
    optimizer.build(variables)
    x, y = tf.constant(ctx.data.x_train), tf.constant(ctx.data.y_train)
    n, b, seed = len(ctx.data.x_train), ctx.batch, ctx.seed
    per_epoch = n // b
    step = tf.Variable(0, dtype=tf.int32, trainable=False)
    order = tf.Variable(epoch_order(n, seed, 0), trainable=False)
    cut = per_epoch >= MIN_EPOCH_FOR_CUTS

    def gradients(xb: tf.Tensor, yb: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        return loss, tape.gradient(loss, variables)

    @tf.function
    def chunk(k: tf.Tensor) -> tf.Tensor:
        loss = tf.constant(0.0)
        if cut and step % per_epoch == 0:
            order.assign(epoch_order(n, seed, step // per_epoch))
        for _ in tf.range(k):
            pos = step % per_epoch
            idx = order[pos * b : pos * b + b]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            loss, grads = gradients(xb, yb)
            norm = tf.linalg.global_norm(grads)
            saved = [tf.identity(v) for v in variables]
            for v, g in zip(variables, grads, strict=True):
                v.assign_add(RHO * g / (norm + 1e-12))
            _, sharp = gradients(xb, yb)
            for v, w in zip(variables, saved, strict=True):
                v.assign(w)
            optimizer.apply_gradients(zip(sharp, variables, strict=True))
            step.assign_add(1)
        return loss

    done, last = 0, tf.constant(0.0)
    while done < steps:
        k = min(BARE_STEPS_PER_CALL, steps - done, per_epoch - done % per_epoch if cut else steps)
        last = chunk(tf.constant(k, tf.int32))
        done += k
    return float(last)
