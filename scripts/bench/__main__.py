"""The command line: `python scripts/bench [--jobs mlp,tape,wide,cnn] [--sink] [--no-targets] ...`; see __init__."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python scripts/bench`: sys.path[0] is this directory, the package needs its parent
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict

import bench  # first: its __init__ quiets TensorFlow before anything imports it
import trainer.config
from bench import report
from bench.cost import COST_STEPS, measure_cost
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
    write_images,
)
from bench.race import FINAL_RATIOS, SWEEP_RATIOS, measure_job
from bench.report import Check, Floor
from bench.sink import SINK_STEPS, measure_sink
from bench.stream import (
    FORMATS,
    KERAS_EPOCHS,
    QUICK_STREAM_SPES,
    QUICK_STREAM_STEPS,
    STREAM_GB,
    STREAM_SPES,
    STREAM_STEPS,
    measure_stream,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/bench", description=bench.__doc__.splitlines()[0])
    p.add_argument("--jobs", default="mlp,tape,wide,cnn", help=f"comma-separated, of {', '.join(JOBS)}")
    p.add_argument("--repeats", type=int, help="default 3; 1 for --stream (it is long)")
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
        "--stream",
        action="store_true",
        help=f"instead: ours on a file-backed dataset streamed from disk vs Keras fit on the same tf.data pipeline, "
        f"steps/s and peak RSS (--steps, default {STREAM_STEPS})",
    )
    p.add_argument(
        "--cost",
        nargs="+",
        metavar="OVERRIDE",
        help=f"instead: steps/s of ours on the first job with these overrides / without them, e.g. "
        f"tracking.system_metrics=false (--steps, default {COST_STEPS})",
    )
    p.add_argument(
        "--launch",
        nargs="*",
        metavar="OVERRIDE",
        help="instead: a whole 1-step `python -m trainer` (the plot on, log_model off; OVERRIDEs added) against "
        "`python -c 'import tensorflow'`, launch to exit, --repeats pairs",
    )
    p.add_argument(
        "--step",
        action="store_true",
        help="instead: a custom step (SAM), ours with every metric logged / the same step hand-written",
    )
    p.add_argument("--stream-gb", default=",".join(f"{gb:g}" for gb in STREAM_GB), help="--stream: file sizes, GiB")
    p.add_argument("--stream-dir", type=Path, help="--stream: where the files are written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="--stream: keep the files written")
    p.add_argument("--stream-formats", default=",".join(FORMATS), help="--stream: numpy, parquet or both")
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
    if args.quick or (args.stream and args.repeats is None):
        args.repeats = 1
    args.repeats = args.repeats or 3
    if args.stream:
        parse_stream(p, args)
    if args.threads:
        try:
            args.threads = tuple(int(n) for n in args.threads.split(","))
            assert len(args.threads) == 2 and min(args.threads) >= 1
        except (ValueError, AssertionError):
            p.error(f"--threads {args.threads!r}: give two integers >= 1, INTRA,INTER, e.g. 1,2")
    args.floor = [parse_floor(p, text) for text in args.floor]
    return args


def parse_stream(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--stream-gb as sizes; N whole epochs of Keras (KERAS_EPOCHS of them), each a whole number of executions."""
    try:
        args.stream_gb = tuple(float(gb) for gb in args.stream_gb.split(","))
        assert args.stream_gb and min(args.stream_gb) > 0
    except (ValueError, AssertionError):
        p.error(f"--stream-gb {args.stream_gb!r}: give sizes in GiB, e.g. 1,3")
    args.stream_formats = tuple(args.stream_formats.split(","))
    if not args.stream_formats or not set(args.stream_formats) <= set(FORMATS):
        p.error(
            f"--stream-formats {','.join(args.stream_formats)!r}: give {' and/or '.join(FORMATS)}, e.g. numpy,parquet"
        )
    if args.threads:  # the Keras children would not get them
        p.error("--threads: not with --stream (each run is its own process, with TensorFlow's default pools)")
    args.spes = QUICK_STREAM_SPES if args.quick else STREAM_SPES
    args.steps = args.steps or (QUICK_STREAM_STEPS if args.quick else STREAM_STEPS)
    unit = KERAS_EPOCHS * math.lcm(*args.spes)
    if args.steps % unit:
        p.error(f"--steps {args.steps}: --stream needs a multiple of {unit} ({KERAS_EPOCHS} epochs of spe {args.spes})")


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
    if args.launch is not None:
        checks = run_launch(args)
    elif args.cost:
        checks = run_cost(args)
    elif args.step:
        checks = run_step(args)
    else:
        checks = run_sink(args) if args.sink else run_stream(args) if args.stream else run_race(args)
    return report.exit_status(checks, enforce=args.targets)


@contextlib.contextmanager
def workdir(jobs: list[str]) -> Iterator[Path]:
    """A temp dir for a program's runs: the template store, and the cnn job's images when it is among `jobs`."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        template_store(Path(tmp))
        if "cnn" in jobs:
            write_images(Path(tmp))
        yield Path(tmp)


def run_race(args: argparse.Namespace) -> list[Check]:
    with workdir(args.jobs) as tmp:
        results = [measure_job(JOBS[name], plan_for(name, args), tmp) for name in args.jobs]
    checks = report.report(results, report.with_floors(args.floor), args.quick)
    if args.json:
        meta = {"argv": sys.argv, "quick": args.quick, "repeats": args.repeats, **machine()}
        targets = [asdict(c) for c in checks]
        args.json.write_text(
            json.dumps({"meta": meta, "jobs": [asdict(r) for r in results], "targets": targets}, indent=1)
        )
    return checks


def run_launch(args: argparse.Namespace) -> list[Check]:
    from bench.startup import measure_launch

    with workdir([]) as tmp:
        result = measure_launch(tmp, args.repeats, args.launch)
    checks = report.launch_report(result)
    if args.json:
        targets = [asdict(c) for c in checks]
        payload = {"argv": sys.argv, **machine(), "launch": asdict(result), "targets": targets}
        args.json.write_text(json.dumps(payload, indent=1))
    return checks


def run_step(args: argparse.Namespace) -> list[Check]:
    from bench.custom_step import QUICK_STEP_STEPS, SAM_JOB, measure_step, report_step

    steps = args.steps or (QUICK_STEP_STEPS if args.quick else SAM_JOB.steps)
    with workdir([]) as tmp:
        result = measure_step(steps, args.repeats or 3, tmp, warm_up=not args.quick)
    checks = report_step(result)
    for check in checks:
        print(check)
    if args.json:
        args.json.write_text(json.dumps({"meta": {"argv": sys.argv, **machine()}, "step": asdict(result)}, indent=1))
    return checks


def run_sink(args: argparse.Namespace) -> list[Check]:
    job = JOBS[args.jobs[0]]
    steps = args.steps or (QUICK_STEPS[job.name][0] if args.quick else SINK_STEPS)
    with workdir([job.name]) as tmp:
        result = measure_sink(job, steps, args.repeats, tmp)
    checks = report.sink_report(result)
    if args.json:
        targets = [asdict(c) for c in checks]
        args.json.write_text(json.dumps({"argv": sys.argv, "sink": asdict(result), "targets": targets}, indent=1))
    return checks


def run_cost(args: argparse.Namespace) -> list[Check]:
    job = JOBS[args.jobs[0]]
    steps = args.steps or (QUICK_STEPS[job.name][0] if args.quick else COST_STEPS)
    with workdir([job.name]) as tmp:
        result = measure_cost(job, args.cost, steps, args.repeats, tmp)
    report.cost_report(result)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, **machine(), "cost": asdict(result)}, indent=1))
    return []


def run_stream(args: argparse.Namespace) -> list[Check]:
    with workdir([]) as tmp:
        root = args.stream_dir or (Path(tempfile.mkdtemp(prefix="bench-stream-")) if args.keep else tmp / "data")
        results = measure_stream(args.stream_gb, args.steps, args.spes, args.repeats, tmp, root, args.keep,
                                 args.stream_formats)  # fmt: skip
    checks = report.stream_report(results, args.quick)
    if args.json:
        targets = [asdict(c) for c in checks]
        payload = {"argv": sys.argv, **machine(), "stream": [asdict(r) for r in results], "targets": targets}
        args.json.write_text(json.dumps(payload, indent=1))
    return checks


if __name__ == "__main__":
    sys.exit(main())
