"""One job, measured: warm-ups, the spe sweep, the final race, the start-up runs, and their summary.

Two races: the sweep runs everyone (Keras at each steps_per_execution); the final race runs only the best
spe, bare and ours, so the best spe's rate is not the luckiest of five noisy medians (the winner's curse).
The ratios to keras-fit best and bare come from the final race. Rates are marginal: (N - n) / (T(N) - T(n)),
T the wall time of the whole call (model build, tracing and opening the store included), so fixed costs
cancel and what is left is the cost of one more step. Keras runs its own optimizer class; bare and ours
run trainer.optim's (the same arithmetic, fused): `keras-fit+fused` shows Keras with ours.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trainer.config
from bench import startup
from bench.competitors import FUSED_FIT, bare_first_loss, entrants, finalists
from bench.harness import Competitor, Job, JobContext, Plan, compose, cpu_seconds, fmt_rate, log, rotated
from trainer.data.prepare import load as load_data

WARM_UP = ("naive", "keras-fit spe=1", "bare", "ours")  # one run of each kind of run before any clock
SWEEP_RATIOS = ("keras-fit spe=1", FUSED_FIT, "naive")  # ours / these: medians of the sweep
FINAL_RATIOS = ("keras-fit best", "bare")  # ours / these: medians of the final race


@dataclass
class JobResult:
    job: str
    about: str
    plan: dict[str, Any]  # the Plan, with its n (small) and naive n
    rates: dict[str, float]  # competitor -> median marginal steps/s (keras-fit best, bare, ours: final race)
    sweep_rates: dict[str, float]  # every competitor in the first race, the spe sweep
    repeats: dict[str, list[float]]  # competitor -> marginal steps/s of each repeat
    seconds: dict[str, dict[str, list[float]]]  # competitor -> steps -> wall seconds of each run
    best_spe: int
    ratios: dict[str, float]  # competitor -> ours / competitor
    ours_loop_rate: float  # ours' own perf/steps_per_sec: the loop only, not waiting for the sink
    ours_tail_s: dict[str, float]  # N and n: median seconds from ours' last step to train() returning
    first_loss: dict[str, float]  # step-0 loss of bare and ours: equal when the job really is the same
    cli: dict[str, Any]  # `python -m trainer` launch -> step 0 done, `import tensorflow` alone, CLI peak RSS
    others_cpu: float  # share of the machine's CPU time other programs took during the repeats (0..1)


def measure_job(job: Job, plan: Plan, workdir: Path) -> JobResult:
    """Start-up pairs first, alone; warm each kind of run up once; then the sweep and the final race."""
    cfg = compose(job, plan.steps, "sqlite:///unused.db")  # the others take model, data, loss, optimizer
    trainer.config.check(cfg)
    ctx = JobContext(job, cfg, load_data(cfg.data), workdir)
    log(f"{job.name}: {job.about}; N={plan.steps} (naive {plan.naive_steps}), {plan.repeats} repeat(s)")
    startup_result = startup.begin(ctx, plan.repeats, alongside=plan.startup_alongside)
    entered = entrants(plan)
    if plan.warm_up:
        for c in entered:
            if c.name in WARM_UP:
                c.run(ctx, c.small)  # first-call costs (imports, kernels, store engines) land on no clock
    ctx.logged.clear()
    busy0, own0, t0 = *cpu_seconds(), time.perf_counter()
    race(ctx, entered, plan.repeats, "sweep")
    # The best of five noisy medians is biased upwards (the winner's curse): the spe is picked on the
    # sweep, and its rate, bare's and ours' come from a second race of just those three.
    best_spe = pick_spe({c.name: c.median() for c in entered}, plan)
    final = finalists(plan, best_spe)
    race(ctx, final, plan.repeats, f"final (keras-fit spe={best_spe})")
    cli = startup_result()  # waited for first, so a smoke run's start-ups count as ours, not as others'
    busy, own = cpu_seconds()
    others = max(busy - busy0 - (own - own0), 0.0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    return summarize(ctx, plan, entered, final, best_spe, cli, others)


def race(ctx: JobContext, entered: list[Competitor], repeats: int, label: str) -> None:
    """A B C ... `repeats` times, each one's N and n back to back, their order alternating."""
    for r in range(repeats):
        for c in rotated(entered, r):
            for s in (c.big, c.small) if r % 2 == 0 else (c.small, c.big):
                c.seconds[s].append(c.run(ctx, s))
        log(f"  {label} {r + 1}: " + ", ".join(f"{c.name} {fmt_rate(c.rates()[-1])}" for c in entered))


def pick_spe(rates: dict[str, float], plan: Plan) -> int:
    fits = {spe: rates[f"keras-fit spe={spe}"] for spe in plan.spes}
    return max(fits, key=lambda spe: fits[spe] if math.isfinite(fits[spe]) else -1.0)


def summarize(
    ctx: JobContext,
    plan: Plan,
    entered: list[Competitor],
    final: list[Competitor],
    best_spe: int,
    cli: dict[str, Any],
    others_cpu: float,
) -> JobResult:
    """Ratios to keras-fit best and bare from the final race; to the rest from the sweep (ours' sweep rate)."""
    sweep = {c.name: c.median() for c in entered}
    finals = {c.name: c.median() for c in final}
    ratios = {name: sweep["ours"] / sweep[name] for name in SWEEP_RATIOS}
    ratios |= {name: finals["ours"] / finals[name] for name in FINAL_RATIOS}
    logged = ctx.logged[plan.steps]
    return JobResult(
        job=ctx.job.name,
        about=ctx.job.about,
        plan={**asdict(plan), "small": plan.small, "naive_small": plan.naive_small},
        rates={**sweep, **finals},
        sweep_rates=sweep,
        repeats={c.name: c.rates() for c in [*entered, *final]},  # finalists' names win
        seconds={c.name: {str(k): v for k, v in c.seconds.items()} for c in [*entered, *final]},
        best_spe=best_spe,
        ratios=ratios,
        ours_loop_rate=statistics.median(x["steps_per_sec"] for x in logged),
        ours_tail_s={str(k): statistics.median(x["tail_s"] for x in v) for k, v in ctx.logged.items()},
        first_loss={"bare": bare_first_loss(ctx), "ours": logged[0]["first_loss"]},
        cli=cli,
        others_cpu=others_cpu,
    )
