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

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CURVE_KEYS = ("train/loss", "train/grad_norm", "train/lr")  # the plot's panels, top to bottom
WINDOW_KEYS = CURVE_KEYS  # their window extremes: train/loss_min, train/loss_max, ...
BINS = 1200  # envelope columns of a matplotlib drawing (draw): at least the axes' pixel width
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
    """The three panels in a 1200 x 900 PNG; log y where all positive (the lr only when it spans 100x).

    Drawn with Pillow, not matplotlib: each panel is a grid of pixels, so the envelope is computed with one range
    per pixel column of the plot area and each column painted from its minimum to its maximum (`Canvas`). Every
    run pays this at its end: matplotlib's constrained layout and Agg took ~0.3 s for these three panels (one step
    or 200,000), and importing it ~0.25 s more where `import tensorflow` had not (startup.py); here ~0.05 s."""
    canvas = Canvas(PLOT_SIZE)
    canvas.title(title)
    panels = canvas.panels(len(CURVE_KEYS))
    span = _step_span(curves)
    for i, (box, key) in enumerate(zip(panels, CURVE_KEYS, strict=True)):
        steps, values = curves.get(key, (np.empty(0), np.empty(0)))
        finite = np.asarray(values, np.float64)[np.isfinite(values)]
        log = bool(finite.size and finite.min() > 0 and (key != "train/lr" or finite.max() > 100 * finite.min()))
        canvas.panel(box, key, steps, values, span, log, last=i == len(panels) - 1)
    canvas.xlabel("step (each pixel column: min to max of the steps it covers)")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.image.save(path, format="png")
    return path


PLOT_SIZE = (1200, 900)  # px
C0, INK, GRID = (31, 119, 180), (0, 0, 0), (225, 225, 225)  # matplotlib's first colour, as `trainer compare` draws
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM, PANEL_GAP = 92, 20, 30, 58, 14  # px around the panels
FONT_PX, TICK_PX = 13, 4


def _step_span(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The shared x range [first step, last step + 1) of all the panels: step s fills [s, s + 1)."""
    firsts = [float(s[0]) for s, _ in curves.values() if len(s)]
    lasts = [float(s[-1]) for s, _ in curves.values() if len(s)]
    return (min(firsts), max(lasts) + 1) if firsts else (0.0, 1.0)


def _font(size: int):
    """DejaVu Sans, the font of matplotlib's (and `trainer compare`'s) plots, from matplotlib's own files, found
    without importing it; Pillow's default font where that file is not there."""
    import importlib.util

    from PIL import ImageFont

    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):  # ValueError: hidden in sys.modules (startup.import_tensorflow)
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        file = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if file.is_file():
            with contextlib.suppress(OSError):
                return ImageFont.truetype(str(file), size)
    try:
        return ImageFont.load_default(size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, log: bool, most: int = 6) -> list[float]:
    """Round values in [lo, hi] for an axis: decades (or 1-2-5 within them) on a log axis, else multiples of
    1, 2, 2.5 or 5 times a power of ten; about `most` of them at most. A log axis too narrow for two such values
    gets the linear ones."""
    if log:
        decades = np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
        for mantissas in ((1.0,), (1.0, 2.0, 5.0)):
            ticks = [m * 10.0**d for d in decades for m in mantissas if lo <= m * 10.0**d <= hi]
            if len(ticks) >= 2:
                return ticks[:: max(1, int(np.ceil(len(ticks) / (most + 1))))]
    raw = (hi - lo) / most
    if not raw > 0:
        return [lo]
    power = 10.0 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    first = np.ceil(lo / step - 1e-9)
    ticks = [float(k * step) + 0.0 for k in np.arange(first, np.floor(hi / step + 1e-9) + 1)]  # + 0.0: no -0
    return [t for t in ticks if t > 0] if log else ticks


def tick_labels(ticks: Sequence[float], log: bool) -> list[str]:
    """The ticks' texts: as many decimals as their spacing needs (0.25, 0.5, 0.75, not 0.250000001); a log
    axis's decades and very large or small values in the shortest form (1e-05, 200, 1e+06)."""
    biggest = max((abs(t) for t in ticks), default=0.0)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    even = len(gaps) > 1 and max(gaps) - min(gaps) <= 1e-9 * max(gaps)  # a narrow log axis gets linear ticks
    if (log and not even) or biggest >= 1e5 or 0 < biggest < 1e-3:
        return [f"{t:.4g}" for t in ticks]
    step = min(gaps, default=biggest) or 1.0
    decimals = next((d for d in range(8) if abs(round(step, d) - step) <= step * 1e-6), 8)
    return [f"{t:.{decimals}f}" for t in ticks]


class Canvas:
    """A white image with panels stacked vertically; each panel: a frame, grid lines at its ticks, tick labels,
    a rotated y label and its curve, drawn per pixel column (`panel`)."""

    def __init__(self, size: tuple[int, int]):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", size, "white")
        self.ink = ImageDraw.Draw(self.image)
        self.font = _font(FONT_PX)
        self.boxes: list[tuple[int, int, int, int]] = []

    def text(self, xy: tuple[float, float], text: str, anchor: str) -> None:
        """`text` placed by `anchor`: its left / middle / right (l, m, r) and top / middle (t, m) at `xy` (by its
        box, which also works for Pillow's bitmap font, whose own anchors are only left-top)."""
        left, top, right, bottom = self.ink.textbbox((0, 0), text, font=self.font)
        x = xy[0] - left - {"l": 0.0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
        y = xy[1] - top - {"t": 0.0, "m": (bottom - top) / 2}[anchor[1]]
        self.ink.text((round(x), round(y)), text, fill=INK, font=self.font)

    def title(self, text: str) -> None:
        if text:
            self.text((self.image.width / 2, MARGIN_TOP / 2), text, "mm")

    def panels(self, n: int) -> list[tuple[int, int, int, int]]:
        """n boxes (left, top, right, bottom: the plot areas, frames excluded) of equal height."""
        width, height = self.image.size
        each = (height - MARGIN_TOP - MARGIN_BOTTOM - PANEL_GAP * (n - 1)) // n
        self.boxes = [(MARGIN_LEFT, MARGIN_TOP + i * (each + PANEL_GAP), width - MARGIN_RIGHT,
                       MARGIN_TOP + i * (each + PANEL_GAP) + each) for i in range(n)]  # fmt: skip
        return self.boxes

    def xlabel(self, text: str) -> None:
        left, _, right, bottom = self.boxes[-1]
        self.text(((left + right) / 2, bottom + TICK_PX + FONT_PX + 12), text, "mt")

    def ylabel(self, box: tuple[int, int, int, int], text: str) -> None:
        from PIL import Image, ImageDraw

        left, top, right, bottom = self.ink.textbbox((0, 0), text, font=self.font)
        label = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(label).text((1 - left, 1 - top), text, fill=255, font=self.font)
        label = label.rotate(90, expand=True)
        self.image.paste(INK, (6, (box[1] + box[3] - label.height) // 2), label)

    def panel(self, box: tuple[int, int, int, int], key: str, steps: np.ndarray, values: np.ndarray,
              span: tuple[float, float], log: bool, last: bool) -> bool:  # fmt: skip
        """One curve in `box` on the shared step `span`; False (and a note in the panel) when nothing finite was
        there to draw."""
        left, top, right, bottom = box
        width, height = right - left, bottom - top
        env = envelope(steps, values, width)
        keep = np.isfinite(env.lo) & np.isfinite(env.hi) & ((env.lo > 0) if log else True)
        columns = np.clip(((env.x[keep] + 0.5 - span[0]) / (span[1] - span[0]) * width).astype(np.int64), 0,
                          width - 1)  # fmt: skip
        lo, hi = env.lo[keep], env.hi[keep]
        to_axis = np.log10 if log else np.asarray
        y_lo, y_hi = self._limits(to_axis(lo), to_axis(hi), log) if keep.any() else (0.0, 1.0)

        def row(v: np.ndarray) -> np.ndarray:  # the pixel row of axis value v (after to_axis), top = 0
            return np.clip(np.round(bottom - 1 - (v - y_lo) / (y_hi - y_lo) * (height - 1)), top, bottom - 1)

        self._axes(box, span, (y_lo, y_hi), log, last)
        if not keep.any():
            self.text(((left + right) / 2, (top + bottom) / 2), f"no {key} logged", "mm")
        elif env.raw:  # fewer steps than columns: the line through them, as matplotlib's plot()
            points = list(zip((left + columns).tolist(), row(to_axis(hi)).tolist(), strict=True))
            if len(points) > 1:
                self.ink.line(points, fill=C0, width=1)
            for x, y in points if len(points) <= 2 else ():  # one or two steps: marked, not a speck
                self.ink.ellipse((x - 2, y - 2, x + 2, y + 2), fill=C0)
        else:
            tops, bottoms = _joined(row(to_axis(hi)).astype(np.int64), row(to_axis(lo)).astype(np.int64), columns)
            for x, a, b in zip((left + columns).tolist(), tops.tolist(), bottoms.tolist(), strict=True):
                self.ink.line(((x, a), (x, b)), fill=C0, width=1)
        self.ylabel(box, key)
        return bool(keep.any())

    @staticmethod
    def _limits(lo: np.ndarray, hi: np.ndarray, log: bool) -> tuple[float, float]:
        """The axis range of the values, 5% beyond them at each end (matplotlib's default margins); one value:
        half its size either side (half a decade on a log axis, whose values here are logarithms)."""
        a, b = float(lo.min()), float(hi.max())
        pad = (b - a) * 0.05 if b > a else 0.5 if log else (abs(a) * 0.5 or 1.0)
        return a - pad, b + pad

    def _axes(self, box: tuple[int, int, int, int], span: tuple[float, float], limits: tuple[float, float],
              log: bool, last: bool) -> None:  # fmt: skip
        left, top, right, bottom = box
        width, height = right - left, bottom - top
        lo, hi = (10.0 ** limits[0], 10.0 ** limits[1]) if log else limits
        yticks = [t for t in nice_ticks(lo, hi, log) if lo <= t <= hi]
        for value, label in zip(yticks, tick_labels(yticks, log), strict=True):
            v = np.log10(value) if log else value
            y = round(bottom - 1 - (v - limits[0]) / (limits[1] - limits[0]) * (height - 1))
            self.ink.line(((left, y), (right - 1, y)), fill=GRID)
            self.ink.line(((left - TICK_PX, y), (left - 1, y)), fill=INK)
            self.text((left - TICK_PX - 3, y), label, "rm")
        first, end = span
        xticks = [t for t in nice_ticks(first, end - 1, False) if t == int(t)] or [first]
        for t in xticks:
            x = left + int((t + 0.5 - first) / (end - first) * width)
            self.ink.line(((x, top), (x, bottom - 1)), fill=GRID)
            self.ink.line(((x, bottom), (x, bottom + TICK_PX - 1)), fill=INK)
            if last:
                self.text((x, bottom + TICK_PX + 2), f"{t:,.0f}", "mt")
        self.ink.rectangle((left - 1, top - 1, right, bottom), outline=INK)


def _joined(tops: np.ndarray, bottoms: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows of each column's bar, the gap to its neighbour's bar (a jump between two ranges) closed half from
    each side, as a line from one to the other would; a spike inside one range stays one column wide."""
    new_tops, new_bottoms = tops.copy(), bottoms.copy()
    adjacent = np.flatnonzero(np.diff(columns) == 1)  # pairs (k, k + 1) of neighbouring columns
    a, b = adjacent, adjacent + 1
    up = bottoms[b] < tops[a] - 1  # rows grow downwards: the right bar entirely above the left one
    mid = (bottoms[b] + tops[a]) // 2
    new_bottoms[b[up]] = np.maximum(new_bottoms[b[up]], mid[up])
    new_tops[a[up]] = np.minimum(new_tops[a[up]], mid[up])
    down = tops[b] > bottoms[a] + 1  # the right bar entirely below the left one
    mid = (bottoms[a] + tops[b]) // 2
    new_bottoms[a[down]] = np.maximum(new_bottoms[a[down]], mid[down])
    new_tops[b[down]] = np.minimum(new_tops[b[down]], mid[down])
    return new_tops, new_bottoms


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
