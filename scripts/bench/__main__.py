"""The command line: `python scripts/bench [--jobs mlp,tape,wide] [--sink] [--no-targets] ...`; see __init__."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python scripts/bench`: sys.path[0] is this directory, the package needs its parent
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import math
import tempfile
from dataclasses import asdict

import bench  # first: its __init__ quiets TensorFlow before anything imports it
import trainer.config
from bench import report
from bench.harness import (
    JOBS,
    QUICK_SPE_CHOICES,
    QUICK_STEPS,
    SPE_CHOICES,
    Plan,
    machine,
    quiet_libraries,
    template_store,
    use_threads,
)
from bench.race import FINAL_RATIOS, SWEEP_RATIOS, measure_job
from bench.report import Check, Floor
from bench.sink import SINK_STEPS, measure_sink


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench", description=bench.__doc__.splitlines()[0])
    p.add_argument("--jobs", default="mlp,tape,wide", help=f"comma-separated, of {', '.join(JOBS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, help="N for keras-fit, bare and ours (default: per job)")
    p.add_argument("--naive-steps", type=int, help="N for naive (default: per job)")
    p.add_argument("--quick", action="store_true", help="tiny N, one repeat: a smoke run, not a measurement")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument(
        "--sink",
        action="store_true",
        help=f"instead: what writing every step's points adds to a run (first job; --steps, default {SINK_STEPS})",
    )
    p.add_argument(
        "--threads",
        metavar="INTRA,INTER",
        help="TensorFlow's thread pools for every competitor (ours via trainer.intra_op/inter_op_threads)",
    )
    p.add_argument("--no-targets", dest="targets", action="store_false", help="report the targets, exit 0 anyway")
    p.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="JOB:COMPETITOR=MIN",
        help="a gating floor of ours / COMPETITOR on JOB, replacing report.FLOORS' own (repeatable)",
    )
    args = p.parse_args(argv)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown:
        p.error(f"unknown job {unknown[0]!r}: choose from {', '.join(JOBS)}")
    if args.quick:
        args.repeats = 1
    if args.threads:
        try:
            args.threads = tuple(int(n) for n in args.threads.split(","))
            assert len(args.threads) == 2 and min(args.threads) >= 1
        except (ValueError, AssertionError):
            p.error(f"--threads {args.threads!r}: give two integers >= 1, INTRA,INTER, e.g. 1,2")
    args.floor = [parse_floor(p, text) for text in args.floor]
    return args


def parse_floor(p: argparse.ArgumentParser, text: str) -> Floor:
    job, _, rest = text.partition(":")
    against, _, minimum = rest.rpartition("=")  # rpartition: "keras-fit spe=1" holds an "=" of its own
    names = (*SWEEP_RATIOS, *FINAL_RATIOS)
    try:
        value = float(minimum)
    except ValueError:
        value = math.nan
    if job not in JOBS or against not in names or not math.isfinite(value):
        p.error(
            f"--floor {text!r}: give JOB:COMPETITOR=MIN, JOB of {', '.join(JOBS)}, COMPETITOR of {', '.join(names)}"
        )
    return Floor(job, against, value)


def plan_for(name: str, args: argparse.Namespace) -> Plan:
    job = JOBS[name]
    steps, naive_steps = QUICK_STEPS[name] if args.quick else (job.steps, job.naive_steps)
    spes = QUICK_SPE_CHOICES if args.quick else SPE_CHOICES
    return Plan(args.steps or steps, args.naive_steps or naive_steps, args.repeats, spes, args.quick)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    trainer.config.register()
    if args.threads:
        use_threads(*args.threads)
    checks = run_sink(args) if args.sink else run_race(args)
    return report.exit_status(checks, enforce=args.targets)


def run_race(args: argparse.Namespace) -> list[Check]:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        template_store(Path(tmp))
        results = [measure_job(JOBS[name], plan_for(name, args), Path(tmp)) for name in args.jobs]
    checks = report.report(results, report.with_floors(args.floor), args.quick)
    if args.json:
        meta = {"argv": sys.argv, "quick": args.quick, "repeats": args.repeats, **machine()}
        targets = [asdict(c) for c in checks]
        args.json.write_text(
            json.dumps({"meta": meta, "jobs": [asdict(r) for r in results], "targets": targets}, indent=1)
        )
    return checks


def run_sink(args: argparse.Namespace) -> list[Check]:
    job = JOBS[args.jobs[0]]
    steps = args.steps or (QUICK_STEPS[job.name][0] if args.quick else SINK_STEPS)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        template_store(Path(tmp))
        result = measure_sink(job, steps, args.repeats, Path(tmp))
    checks = report.sink_report(result)
    if args.json:
        targets = [asdict(c) for c in checks]
        args.json.write_text(json.dumps({"argv": sys.argv, "sink": asdict(result), "targets": targets}, indent=1))
    return checks


if __name__ == "__main__":
    sys.exit(main())
