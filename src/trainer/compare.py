"""Compare finished runs side by side: a sorted table and loss / gradient-norm curves in one PNG.

    trainer compare                                    # every run of experiment tracking.experiment
    trainer compare latest_sweep=true                  # the children of the newest sweep (Hydra multirun)
    trainer compare parent=<run id> format=markdown out=reports/

Curves are drawn as per-pixel min/max envelopes (tracking/curves.py: a one-step spike shows however long the
run), with a smoothed line over each; overrides every run shares are printed once, above the table.
It reads only what the trainer logs (the `overrides` tag, `train/*`, `val/*`, `perf/*` metrics), so it works
on any store the trainer wrote to. When a sweep's parent run is selected, the PNG, the tables and the best
child (trainer.objective's rule) are logged back onto the parent, so the sweep's own page in the MLflow UI
shows the outcome. `python -m trainer compare ...` and `python -m trainer.compare ...` are the same command.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainer import cli
from trainer.config import TrainerError
from trainer.lr_find import TAG as LR_FIND_TAG
from trainer.objective import FALLBACK, PRIMARY, best_run, objective_key
from trainer.tracking import curves
from trainer.tracking.connect import check_readable

PLOT_SIZE_IN, PLOT_DPI = (12.0, 4.5), 100  # -> exactly 1200 x 450 px: predictable for reports and tests
COLUMNS = ("run", "overrides", "status", "final_train_loss", "objective", "best_step", "steps_per_sec", "points")
DIGITS = 4  # significant digits in the table and markdown (the CSV keeps full precision)


@dataclass
class Options:
    """The command's keys (`trainer compare --help` lists them from here)."""

    uri: str | None = cli.key(None, "tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str | None = cli.key(None, "the experiment; null: tracking.experiment's")
    parent: str | None = cli.key(None, "only the child runs of this sweep run (a run id)")
    latest_sweep: bool = cli.key(False, "the children of the newest run tagged sweep")
    objective: str = cli.key(PRIMARY, f"sort by this, ascending ({PRIMARY}: {FALLBACK} in a run without it)")
    format: str = cli.key("table", "what to print on stdout:", ("table", "markdown", "csv"))
    out: str = cli.key(".", "where compare.png, compare.md and compare.csv go")
    smooth: float = cli.key(0.9, "EMA weight of the line drawn over each run's min/max envelope; 0: none")


@dataclass
class Row:
    """One run's line in the table, plus the histories the plot needs (fetched once, used twice)."""

    run_id: str
    name: str
    overrides: str
    status: str
    final_train_loss: float | None
    objective_key: str
    objective: float | None
    best_step: int | None
    steps_per_sec: float | None
    points: int
    val: dict[str, float] = field(default_factory=dict)  # the run's last val/* values: the task's metrics
    loss: list[tuple[int, float]] = field(default_factory=list, repr=False)
    grad_norm: list[tuple[int, float]] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        """The legend entry: what was varied, which is what a reader of a sweep plot wants to see."""
        return self.overrides or self.name


# --- selecting runs ----------------------------------------------------------------------------
def select_runs(
    client: MlflowClient, experiment: str, parent: str | None = None, latest_sweep: bool = False
) -> tuple[list[Run], Run | None]:
    """The runs to compare and the sweep parent they belong to (None when comparing a whole experiment)."""
    if parent:
        parent_run = _get_run(client, parent)
        exp_ids = [parent_run.info.experiment_id]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrainerError(f"no experiment named {experiment!r} in {client.tracking_uri}")
        exp_ids = [exp.experiment_id]
        parent_run = _latest_sweep(client, exp_ids, experiment) if latest_sweep else None
    if parent_run is not None:
        runs = _search_all(client, exp_ids, f"tags.`mlflow.parentRunId` = '{parent_run.info.run_id}'")
        runs = [r for r in runs if r.data.tags.get(LR_FIND_TAG) != "true"]  # optimizer.lr=auto's finder runs
        if not runs:
            raise TrainerError(
                f"sweep run {parent_run.info.run_id} ({shown(parent_run.info.run_name)}) has no child runs"
            )
        return runs, parent_run
    runs = _search_all(client, exp_ids)
    runs = [r for r in runs if "true" not in (r.data.tags.get("sweep"), r.data.tags.get(LR_FIND_TAG))]
    if not runs:
        raise TrainerError(f"experiment {experiment!r} has no runs")
    return runs, None


def _get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrainerError(f"no run {run_id!r} in {client.tracking_uri}") from None


def _latest_sweep(client: MlflowClient, exp_ids: list[str], experiment: str) -> Run:
    found = client.search_runs(exp_ids, "tags.sweep = 'true'", max_results=1, order_by=["attributes.start_time DESC"])
    if not found:
        raise TrainerError(f"experiment {experiment!r} has no sweep run (a run tagged sweep=true)")
    return found[0]


def _search_all(client: MlflowClient, exp_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every matching run, page by page: a large sweep easily passes one page (1000 runs)."""
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string, order_by=["attributes.start_time ASC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# --- the table ---------------------------------------------------------------------------------
def summarize(client: MlflowClient, runs: Sequence[Run], objective: str = PRIMARY) -> list[Row]:
    """One row per run, sorted by the objective ascending; runs without it (failed early, say) last."""
    rows = [_row(client, run, objective) for run in runs]
    return sorted(rows, key=lambda r: (r.objective is None, r.objective if r.objective is not None else 0.0))


def _row(client: MlflowClient, run: Run, objective: str) -> Row:
    run_id, metrics = run.info.run_id, run.data.metrics
    key = objective_key(metrics) if objective == PRIMARY else objective
    loss = _history(client, run_id, "train/loss")
    target = _history(client, run_id, key) if key in metrics else []
    # One point (the end-of-run evaluation) says nothing about when the run was best; the training curve does.
    best = min(target if len(target) > 1 else loss, key=lambda p: p[1], default=None)
    return Row(
        run_id=shown(run_id),
        name=shown(run.info.run_name or run_id[:8]),
        overrides=shown(run.data.tags.get("overrides", "")),
        status=shown(run.info.status),
        final_train_loss=loss[-1][1] if loss else None,
        objective_key=key,
        objective=_finite(target[-1][1]) if target else None,
        best_step=best[0] if best else None,
        steps_per_sec=metrics.get("perf/steps_per_sec"),
        points=len(loss),
        val={k: v for k, v in metrics.items() if k.startswith("val/")},
        loss=loss,
        grad_norm=_history(client, run_id, "train/grad_norm") if "train/grad_norm" in metrics else [],
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in step order; the store returns points in no promised order."""
    points = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]


def _finite(value: float) -> float | None:
    """NaN (a diverged run) sorts as missing, not as the best run."""
    return None if math.isnan(value) else value


def task_columns(rows: Sequence[Row], objective: str) -> list[str]:
    """The val/* metrics any run logged (val/accuracy, ...), each a column; the objective has its own."""
    return sorted({k for r in rows for k in r.val} - {objective, *(r.objective_key for r in rows)})


def _cells(row: Row, objective: str, extra: Sequence[str], label: str) -> list[str]:
    """Table cells as text, numbers to DIGITS significant digits; a fallback objective says which it is."""
    value = _fmt(row.objective)
    if row.objective is not None and row.objective_key != objective:
        value += f" ({row.objective_key})"
    sps = "" if row.steps_per_sec is None else f"{row.steps_per_sec:,.0f}"
    best = "" if row.best_step is None else str(row.best_step)
    vals = [_fmt(row.val.get(k)) for k in extra]
    return [row.name, label, row.status, _fmt(row.final_train_loss), value, *vals, best, sps, str(row.points)]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.{DIGITS}g}"


def _headers(objective: str, extra: Sequence[str]) -> list[str]:
    return ["run", "overrides", "status", "final train loss", objective, *extra, "best step", "steps/s", "points"]


def _table(rows: Sequence[Row], objective: str) -> tuple[list[str], list[list[str]], str]:
    """Headers, cell rows and the overrides every run shares (shown once, not in each row)."""
    extra = task_columns(rows, objective)
    labels, shared = differing_overrides(rows)
    return (
        _headers(objective, extra),
        [_cells(r, objective, extra, lab) for r, lab in zip(rows, labels, strict=True)],
        shared,
    )


def to_markdown(rows: Sequence[Row], objective: str = PRIMARY) -> str:
    """A GitHub-style table: readable as text and rendered by the MLflow UI's artifact viewer."""
    headers, cells, shared = _table(rows, objective)
    lines = [f"Overrides shared by every run: `{shared}`", ""] if shared else []
    lines += [_md_line(headers), _md_line(["---"] * len(headers))]
    lines += [_md_line(c) for c in cells]
    return "\n".join(lines) + "\n"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_csv(rows: Sequence[Row], objective: str = PRIMARY) -> str:
    """Machine-readable: raw numbers (full precision), each row's whole overrides, the run id, which metric the
    objective is, then the task's val/* columns."""
    extra = task_columns(rows, objective)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", *COLUMNS, "objective_key", *extra])
    for r in rows:
        numbers = ["" if v is None else v for v in (r.final_train_loss, r.objective, r.best_step, r.steps_per_sec)]
        vals = [r.val.get(k, "") for k in extra]
        writer.writerow([r.run_id, r.name, r.overrides, r.status, *numbers, r.points, r.objective_key, *vals])
    return buf.getvalue()


def print_table(rows: Sequence[Row], objective: str = PRIMARY) -> None:
    from rich.table import Table
    from rich.text import Text

    headers, cells, shared = _table(rows, objective)
    caption = Text(f"overrides shared by every run: {shared}") if shared else None  # Text: no markup from the store
    table = Table(title=f"{len(rows)} runs by {objective}", caption=caption, caption_justify="left")
    for i, header in enumerate(headers):
        table.add_column(Text(header), justify="right" if i >= 3 else "left", overflow="fold")
    for c in cells:
        table.add_row(*(Text(cell) for cell in c))
    cli.plain_console().print(table)


def shown(text: str) -> str:
    """`text` from the store, safe to print: control and format characters (ESC sequences that set the terminal's
    title, clear the screen or hide text; bidi overrides) written out as escapes (`\\x1b`, `\\u202e`)."""
    if text.isprintable():  # str.isprintable: False for every control, format and separator but the space
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


# --- the plot ----------------------------------------------------------------------------------
def plot(rows: Sequence[Row], path: Path, smooth: float) -> Path:
    """train/loss and train/grad_norm per run against the step, log y, in one fixed-size PNG: each run's
    min/max envelope (every step counts, curves.envelope) with its `smooth` EMA over it, the legend outside."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend needed
    from matplotlib.lines import Line2D

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    labels, shared = legend_labels(rows)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for ax, attr, title in zip(axes, ("loss", "grad_norm"), ("train/loss", "train/grad_norm"), strict=True):
        drawn = False
        for row, color in zip(rows, colors, strict=True):
            points = np.array(getattr(row, attr), np.float64).reshape(-1, 2)
            values = np.where(points[:, 1] > 0, points[:, 1], np.nan)  # log y: positive only
            drawn |= curves.draw(
                ax, points[:, 0], values, color=color, smooth=smooth, bins=int(PLOT_SIZE_IN[0] * PLOT_DPI)
            )
        ax.set(title=title, xlabel="step")
        if drawn:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, f"no {title} logged", ha="center", va="center", transform=ax.transAxes)
    if rows:
        handles = [Line2D([], [], color=c, linewidth=2) for c in colors]
        title = "\n".join(textwrap.wrap(f"all: {shared}", 40)[:4]) if shared else None
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", title=title, title_fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    return path


def differing_overrides(rows: Sequence[Row]) -> tuple[list[str], str]:
    """Per run the overrides that differ between runs, and those every run shares (shown once): a sweep's jobs
    repeat the same fixed overrides, which made each row of the table ~700 characters long."""
    token_sets = [set(r.overrides.split()) for r in rows if r.overrides]
    common = set.intersection(*token_sets) if len(rows) > 1 and len(token_sets) == len(rows) else set()
    differing = [" ".join(t for t in r.overrides.split() if t not in common) for r in rows]
    shared = " ".join(t for t in rows[0].overrides.split() if t in common) if rows else ""
    return differing, shared


def legend_labels(rows: Sequence[Row]) -> tuple[list[str], str]:
    """differing_overrides, short enough for a legend; a run without overrides by its name."""
    differing, shared = differing_overrides(rows)
    labels = [
        _shorten(d if d else "(shared only)" if r.overrides else r.name) for r, d in zip(rows, differing, strict=True)
    ]
    return labels, shared


def _shorten(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- writing and logging back ------------------------------------------------------------------
def write_outputs(rows: Sequence[Row], out: Path, objective: str, smooth: float) -> list[Path]:
    """compare.png, compare.md and compare.csv in `out`; both tables are tiny, so both are always written."""
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "compare.md", out / "compare.csv"
    md.write_text(to_markdown(rows, objective))
    csv_path.write_text(to_csv(rows, objective))
    return [plot(rows, out / "compare.png", smooth), md, csv_path]


def log_best(client: MlflowClient, parent_id: str, runs: Sequence[Run]) -> Run | None:
    """The sweep's page then shows its best child (trainer.objective's rule: the FINISHED run with the lowest
    finite objective, whatever `objective=` sorts the table by): tags `best_run_id`, `best_run_name`,
    `best_overrides`, metrics `best/objective` and `best/<its objective key>`. The one place a sweep's best
    is found and written; the sweep's own end comes here too."""
    best = best_run(runs)
    if best is not None:
        metrics, key = best.data.metrics, objective_key(best.data.metrics)
        client.set_tag(parent_id, "best_run_id", best.info.run_id)
        client.set_tag(parent_id, "best_run_name", best.info.run_name or best.info.run_id[:8])
        client.set_tag(parent_id, "best_overrides", best.data.tags.get("overrides", ""))
        client.log_metric(parent_id, "best/objective", metrics[key])
        client.log_metric(parent_id, f"best/{key}", metrics[key])
    return best


# --- cross-validation ----------------------------------------------------------------------------
@dataclass
class Folds:
    """One configuration of a fold sweep: its finished folds and each val metric's mean and std across them."""

    overrides: str  # the runs' overrides but data.fold
    folds: int  # data.folds (K)
    done: list[int]  # the folds that finished
    stats: dict[str, tuple[float, float]]  # metric -> (mean, std over the finished folds, numpy's ddof=0)


def cross_validation(runs: Sequence[Run]) -> list[Folds] | None:
    """A sweep whose every run has `data.folds` set: its runs grouped by their overrides less `data.fold`, each
    group's val/* and objective summarized over its folds (no best fold: the folds are one estimate). None when
    the runs are no fold sweep."""
    ks = {r.data.params.get("data.folds") for r in runs}
    if not runs or len(ks) != 1 or next(iter(ks)) in (None, "None"):
        return None
    groups: dict[str, list[Run]] = {}
    for r in runs:
        key = " ".join(o for o in r.data.tags.get("overrides", "").split() if not o.startswith("data.fold="))
        groups.setdefault(key, [])
        if r.info.status == "FINISHED":
            groups[key].append(r)
    out = []
    for key, members in groups.items():
        names = sorted({k for r in members for k in r.data.metrics if k.startswith("val/") or k == FALLBACK})
        stats = {}
        for name in names:
            values = np.array([r.data.metrics[name] for r in members if name in r.data.metrics], dtype=np.float64)
            stats[name] = (float(values.mean()), float(values.std()))
        done = sorted(int(r.data.params.get("data.fold", -1)) for r in members)
        out.append(Folds(key, int(next(iter(ks))), done, stats))
    return out


def log_folds(client: MlflowClient, parent_id: str, groups: Sequence[Folds]) -> Folds | None:
    """The fold sweep's summary on its parent: metrics `cv/<metric>/mean` and `cv/<metric>/std` and `cv/folds`
    (the folds that finished) of its configuration; with several configurations (say lr x fold), of the one
    with the lowest mean objective, named by tag `cv_overrides`."""
    scored = [g for g in groups if any(k in g.stats for k in (PRIMARY, FALLBACK))]
    if not scored:
        return None
    chosen = min(scored, key=lambda g: g.stats.get(PRIMARY, g.stats.get(FALLBACK))[0])
    for name, (mean, std) in chosen.stats.items():
        client.log_metric(parent_id, f"cv/{name}/mean", mean)
        client.log_metric(parent_id, f"cv/{name}/std", std)
    client.log_metric(parent_id, "cv/folds", len(chosen.done))
    client.set_tag(parent_id, "cv_overrides", chosen.overrides)
    return chosen


def print_folds(groups: Sequence[Folds]) -> None:
    from rich.table import Table
    from rich.text import Text

    names = sorted({k for g in groups for k in g.stats})
    table = Table(title=f"cross-validation: {groups[0].folds} folds, mean ± std across them")
    for header in ["overrides", "folds done", *names]:
        table.add_column(Text(header))
    for g in groups:
        cells = [f"{g.stats[n][0]:.6g} ± {g.stats[n][1]:.3g}" if n in g.stats else "" for n in names]
        table.add_row(Text(shown(g.overrides) or "(none)"), Text(f"{len(g.done)} of {g.folds}"), *map(Text, cells))
    cli.plain_console().print(table)


# --- the command -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`trainer compare key=value ...`: the exit status (1 after one `error:` line)."""
    return cli.main_of("compare", Options, __doc__.splitlines()[0], lambda opts, _: compare(opts), argv)


def compare(opts: Options) -> None:
    """Select, tabulate, plot, write, log back onto a sweep's parent, then print; raises TrainerError."""
    if opts.parent and opts.latest_sweep:
        raise TrainerError(f"parent={opts.parent} and latest_sweep=true both pick the runs: give one")
    if not 0 <= opts.smooth < 1:
        raise TrainerError(f"smooth={opts.smooth} is invalid: expected a number in [0, 1) (0: no smoothed line)")
    uri = opts.uri or mlflow.get_tracking_uri()
    check_readable(uri)  # a server answers, a SQLite file is MLflow's: nothing is made or migrated
    client = MlflowClient(uri)
    experiment = opts.experiment or cli.default_experiment()
    runs, parent = select_runs(client, experiment, opts.parent, opts.latest_sweep)
    folds = cross_validation(runs)  # a fold sweep is one estimate, summarized: it has no best run
    best = None
    if parent and folds:
        log_folds(client, parent.info.run_id, folds)
    elif parent:
        best = log_best(client, parent.info.run_id, runs)  # first: it needs no plot
    rows = summarize(client, runs, opts.objective)
    if rows and opts.objective != PRIMARY and all(r.objective is None for r in rows):
        raise TrainerError(f"objective={opts.objective}: no run here logged a finite {opts.objective} (e.g. "
                           f"{PRIMARY}, {FALLBACK}, train/loss, val/accuracy)")  # fmt: skip
    files = write_outputs(rows, Path(opts.out), opts.objective, opts.smooth)
    for path in files if parent else ():
        client.log_artifact(parent.info.run_id, str(path))
    _print(rows, opts.format, opts.objective)
    if folds and opts.format == "table":
        print_folds(folds)
    elif folds:
        for g in folds:
            shown_stats = ", ".join(f"{k} {m:.6g} ± {s:.3g}" for k, (m, s) in g.stats.items())
            print(
                f"cross-validation ({len(g.done)} of {g.folds} folds) {shown(g.overrides)}: {shown_stats}",
                file=sys.stderr,
            )  # fmt: skip  (stdout holds the machine-readable table)
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    if parent is not None:
        tail = f"; best {shown(best.info.run_name)} ({best.info.run_id})" if best else ""
        print(f"logged to sweep run {parent.info.run_id}{tail}", file=sys.stderr)


def _print(rows: Sequence[Row], fmt: str, objective: str) -> None:
    if fmt == "table":
        print_table(rows, objective)
    else:
        sys.stdout.write(to_markdown(rows, objective) if fmt == "markdown" else to_csv(rows, objective))


if __name__ == "__main__":
    sys.exit(main())
