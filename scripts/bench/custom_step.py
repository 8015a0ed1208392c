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

from bench.competitors import bare_loop, run_ours
from bench.harness import MLP, Competitor, Job, JobContext, compose, log, timed
from bench.race import race
from bench.report import Check
from trainer.data.prepare import load as load_data

RHO = 0.05
STEP_FLOOR = 0.95
SAM_JOB = Job(
    "sam",
    f"{MLP} trainer.batch_size=256 optimizer=adam optimizer.lr=1e-3 step=sam step.rho={RHO}",
    6000,
    0,
    "SAM on the MLP 32-64-64-1, 65,536 rows, batch 256, Adam: two passes a step",
)
QUICK_STEP_STEPS = 1000  # 200 left the N - n difference inside a loaded machine's noise: a NaN rate


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
    return bare_loop(ctx, steps, update=sam_update)


def sam_update(model, loss_fn, optimizer, variables, xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
    def gradients() -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        return loss, tape.gradient(loss, variables)

    loss, grads = gradients()
    norm = tf.linalg.global_norm(grads)
    saved = [tf.identity(v) for v in variables]
    for v, g in zip(variables, grads, strict=True):
        v.assign_add(RHO * g / (norm + 1e-12))
    _, sharp = gradients()
    for v, w in zip(variables, saved, strict=True):
        v.assign(w)
    optimizer.apply_gradients(zip(sharp, variables, strict=True))
    return loss
