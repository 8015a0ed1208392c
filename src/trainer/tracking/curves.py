"""Long curves drawn faithfully: per-pixel min/max envelopes, the end-of-run plot, and N-step window extremes.

MLflow's UI draws a metric from ~320 evenly spaced points (its get-history-bulk-interval endpoint), so a
one-step loss spike in a 200,000-step run is usually not among them. Here every step counts: a curve is cut
into as many equal step ranges as the plot has pixel columns, and each range is drawn as a vertical bar from
its minimum to its maximum (`envelope`), so a single step's spike is the top of its column. `trainer compare`
draws the same envelopes (the one home of that arithmetic is `envelope`).

Where the values come from: the metric sink's collector thread already turns every chunk into numbers; it
hands train/loss, train/grad_norm and train/lr to a `CurveRecorder` (a list append per chunk, ~12 bytes a step:
12 MB for 1M steps), never the training thread. Reading the same 200,000 steps back from a SQLite store at the
end took 25 s through MLflow's get_metric_history (3 metrics) and 4.5 s a metric through a direct SQL select
(2 shared cores); so the store is read only for the steps a resumed run did not see itself.

`WindowExtremes` (tracking.window_extremes=N) logs each N-step window's min and max as metrics, from the same
collector thread, so the UI's own charts show spikes its sampling would miss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CURVE_KEYS = ("train/loss", "train/grad_norm", "train/lr")  # the plot's panels, top to bottom
WINDOW_KEYS = CURVE_KEYS  # their window extremes: train/loss_min, train/loss_max, ...
PLOT_SIZE_IN, PLOT_DPI = (12.0, 9.0), 100  # -> exactly 1200 x 900 px
BINS = 1200  # envelope columns: at least the axes' pixel width, so no pixel column mixes two ranges' gaps
ARTIFACT = "plots/curves.png"


# --- the envelope ------------------------------------------------------------------------------
@dataclass
class Envelope:
    """A curve cut into equal step ranges: range i holds steps [edges[i], edges[i+1]) and its values run from
    lo[i] to hi[i] (NaN ignored); `starts[i]` is the index of its first point. Empty ranges are dropped."""

    x: np.ndarray  # the centre step of each range
    lo: np.ndarray
    hi: np.ndarray
    starts: np.ndarray  # index into the input of each range's first point; the last ends at len(input)
    raw: bool  # no range holds more than one point: the curve itself is the better drawing


def envelope(steps: np.ndarray, values: np.ndarray, bins: int = BINS) -> Envelope:
    """Min and max of `values` over `bins` equal ranges of `steps` (sorted ascending), in O(n)."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if len(steps) == 0:
        empty = np.empty(0)
        return Envelope(empty, empty, empty, np.empty(0, np.int64), True)
    edges = np.linspace(steps[0], steps[-1] + 1, bins + 1)
    starts = np.unique(np.searchsorted(steps, edges[:-1], side="left"))
    starts = starts[starts < len(steps)]
    with np.errstate(invalid="ignore"):
        lo, hi = np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)  # fmin/fmax: NaN-ignoring
    ends = np.append(starts[1:], len(steps))
    x = (steps[starts] + steps[ends - 1]) / 2
    return Envelope(x, lo, hi, starts, raw=bool(np.all(ends - starts == 1)))


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average (weight 0: the values; NaN carried over)."""
    out, acc, norm = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(np.asarray(values, np.float64)):
        if np.isfinite(v):
            acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = acc / norm if norm else np.nan
    return out


def draw(ax, steps: np.ndarray, values: np.ndarray, color=None, label: str | None = None, smooth: float = 0.0,
         bins: int = BINS) -> bool:  # fmt: skip
    """One curve on `ax`: its min/max envelope as one-pixel bars (a spike one step wide still colours its
    column), the raw line where there are fewer steps than columns; an EMA of the range means over it when
    `smooth` > 0. False when nothing finite was there to draw."""
    env = envelope(steps, values, bins)
    keep = np.isfinite(env.lo) & np.isfinite(env.hi)
    if not keep.any():
        return False
    if env.raw:
        (line,) = ax.plot(env.x[keep], env.hi[keep], color=color, linewidth=1.0, label=label,
                          alpha=0.45 if smooth else 1.0)  # fmt: skip
        color = line.get_color()
    else:
        style = {"linewidth": 1.0, "alpha": 0.45 if smooth else 1.0}
        bars = ax.vlines(env.x[keep], env.lo[keep], env.hi[keep], colors=color, label=label, **style)
        color = bars.get_color()[0]
        for edge in (env.lo, env.hi):  # the edges too: Agg draws nothing for a bar of zero height (a flat lr)
            ax.plot(env.x[keep], edge[keep], color=color, **style)
    if smooth:
        means = np.add.reduceat(np.nan_to_num(np.asarray(values, np.float64)), env.starts)
        means /= np.diff(np.append(env.starts, len(values)))
        ax.plot(env.x[keep], ema(means, smooth)[keep], color=color, linewidth=1.5)
    return True


# --- the end-of-run artifact ---------------------------------------------------------------------
@dataclass
class CurveRecorder:
    """Every step's train/loss, train/grad_norm and train/lr, as the sink's collector sees them (all steps,
    whatever tracking.log_every thins from the store). Appends only: the sink thread owns it until close."""

    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def add(self, steps: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        for key in CURVE_KEYS:
            if key in arrays:
                self.parts.setdefault(key, []).append((steps, np.asarray(arrays[key], np.float32)))

    def first_step(self) -> int | None:
        firsts = [int(p[0][0][0]) for p in self.parts.values() if p and len(p[0][0])]
        return min(firsts) if firsts else None

    def curves(self, before: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
        """{key: (steps, values)} in step order; `before`: what the store holds from earlier attempts."""
        out = {}
        for key in CURVE_KEYS:
            parts = [*([before[key]] if before and key in before else []), *self.parts.get(key, [])]
            if parts:
                out[key] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return out


def plot_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """The three panels in a 1200 x 900 PNG; log y where all positive (the lr only when it spans 100x)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(len(CURVE_KEYS), 1, sharex=True)
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        steps, values = curves.get(key, (np.empty(0), np.empty(0)))
        drawn = draw(ax, steps, values, color="C0")
        ax.set_ylabel(key)
        finite = np.asarray(values)[np.isfinite(values)]
        if drawn and finite.size and finite.min() > 0 and (key != "train/lr" or finite.max() > 100 * finite.min()):
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("step (each pixel column: min to max of the steps it covers)")
    if title:
        axes[0].set_title(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI, format="png")  # no bbox_inches="tight": it would change the pixel size
    return path


# --- window extremes -----------------------------------------------------------------------------
@dataclass
class WindowExtremes:
    """Min and max of each N-step window [jN, (j+1)N) of WINDOW_KEYS, logged at the window's last step as
    `train/loss_min`, `train/loss_max`, ... (not `train/loss/max`: MLflow's file store keeps a metric as a
    file, so `train/loss` cannot also be a folder). Windows are aligned to global steps, so a window that
    spans chunks is carried over, and a resumed run `seed`s the part of its first window that an earlier
    attempt ran (read from the store), giving the windows an uninterrupted run gives."""

    every: int
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    window: int | None = None  # the index j of the window being filled
    last_step: int | None = None

    def seed(self, steps: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Values an earlier attempt logged before the resume step (only those of its first window count)."""
        if len(steps):
            self.add(np.asarray(steps), arrays)

    def add(self, steps: np.ndarray, arrays: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Fold one chunk in; returns (key, steps, values) of the windows it completed (steps ascending)."""
        keys = [k for k in WINDOW_KEYS if k in arrays]
        if not len(steps) or not keys:
            return []
        n, windows = self.every, steps // self.every
        if self.window is not None and windows[0] != self.window:  # a gap: the carried window cannot complete
            self.lo, self.hi, self.window = {}, {}, None
        cuts = np.flatnonzero(np.diff(windows)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.append(cuts, len(steps))
        done = (steps[ends - 1] + 1) % n == 0  # the segment reaches its window's last step
        out = []
        for key in keys:
            values = np.asarray(arrays[key], np.float64)
            with np.errstate(invalid="ignore"):
                lo, hi = np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)
            if self.window is not None and key in self.lo:  # the carried part of the first window
                lo[0], hi[0] = np.fmin(lo[0], self.lo[key]), np.fmax(hi[0], self.hi[key])
            name = key.removeprefix("train/")
            out += [(f"train/{name}_min", steps[ends - 1][done], lo[done]),
                    (f"train/{name}_max", steps[ends - 1][done], hi[done])]  # fmt: skip
            self.lo[key], self.hi[key] = lo[-1], hi[-1]
        self.window, self.last_step = (None if done[-1] else int(windows[-1])), int(steps[-1])
        if done[-1]:
            self.lo, self.hi = {}, {}
        return [s for s in out if len(s[1])]

    def tail(self) -> list[tuple[str, int, float]]:
        """The last, partial window of a run that ends between multiples of N, at the run's end step (last step
        + 1, where its summary metrics are): a resume that extends the run drops it with the other train/* points
        at steps >= its start (writers.SqlBulkWriter.delete_after), and logs the whole window in its place."""
        if self.window is None or self.last_step is None:
            return []
        return [(f"train/{k.removeprefix('train/')}_{side}", self.last_step + 1, float(d[k]))
                for k in self.lo for side, d in (("min", self.lo), ("max", self.hi))]  # fmt: skip


def read_history(client, run_id: str, keys: Sequence[str], before: int, after: int = 0) -> dict:
    """{key: (steps, values)} of the points with after <= step < before: what a resumed run's earlier attempts
    logged, for its plot and its first window. One SQL select a key on SQL stores, else get_metric_history."""
    from trainer.tracking import compat

    store, out = compat.sql_store(client), {}
    for key in keys:
        if store is not None:
            from sqlalchemy import select

            metric, _ = compat.tables()
            query = select(metric.step, metric.value).where(
                metric.run_uuid == run_id, metric.key == key, metric.step < before, metric.step >= after
            )
            with store.ManagedSessionMaker() as session:
                points = session.execute(query.order_by(metric.step)).all()
        else:
            points = sorted(
                (m.step, m.value) for m in client.get_metric_history(run_id, key) if after <= m.step < before
            )
        if points:
            array = np.array(points, np.float64)
            out[key] = (array[:, 0].astype(np.int64), array[:, 1])
    return out
