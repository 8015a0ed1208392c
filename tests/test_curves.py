"""Long curves (trainer.tracking.curves): the min/max envelope's arithmetic, the end-of-run plot artifact in a
real MLflow SQLite store, and tracking.window_extremes on real training runs, across chunks and a resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import compose_config, new_store
from trainer.tracking import Chunk, Run
from trainer.tracking.curves import ARTIFACT, BINS, WindowExtremes, envelope, nice_ticks, tick_labels

SPIKE_STEP, SPIKE = 123_457, 50.0


def noisy_loss(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 / np.sqrt(1 + np.arange(n) / 100) + 0.05 * rng.random(n)).astype(np.float32)


def test_envelope_bins_are_numpys_min_and_max_and_keep_a_one_step_spike():
    values = noisy_loss(200_000).astype(np.float64)
    values[SPIKE_STEP], values[7] = SPIKE, np.nan  # NaN is ignored, not spread over its column
    steps = np.arange(200_000)
    env = envelope(steps, values, BINS)
    assert len(env.x) == BINS and not env.raw and env.starts[0] == 0
    ends = np.append(env.starts[1:], len(values))
    assert set(ends - env.starts) <= {166, 167}  # 200,000 steps over 1,200 columns
    for i, (a, b) in enumerate(zip(env.starts, ends, strict=True)):
        assert env.lo[i] == np.nanmin(values[a:b]) and env.hi[i] == np.nanmax(values[a:b])
        assert steps[a] <= env.x[i] <= steps[b - 1]
    spiked = np.searchsorted(env.starts, SPIKE_STEP, side="right") - 1
    assert env.hi[spiked] == SPIKE and np.flatnonzero(env.hi == SPIKE).tolist() == [spiked]
    assert env.hi[np.arange(BINS) != spiked].max() < 1.1  # what a ~320-point sample of the curve would show


def test_a_short_curve_is_drawn_raw():
    values = np.array([3.0, 1.0, 2.0])
    env = envelope(np.array([10, 11, 12]), values, BINS)
    assert env.raw and env.x.tolist() == [10, 11, 12] and env.lo.tolist() == env.hi.tolist() == values.tolist()


@pytest.mark.parametrize(
    ("lo", "hi", "log", "labels"),
    [
        (0.0, 1.0, False, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]),
        (-0.03, 0.12, False, ["-0.025", "0.000", "0.025", "0.050", "0.075", "0.100"]),
        (0.003, 40.0, True, ["0.01", "0.1", "1", "10"]),
        (2.5, 4.5, True, ["2.5", "3.0", "3.5", "4.0", "4.5"]),  # no decade nor 1-2-5 inside: linear ticks
        (1e-7, 10.0, True, ["1e-07", "1e-05", "0.001", "0.1", "10"]),  # every other decade
    ],
)
def test_the_plots_axis_ticks_are_round_and_labelled_by_their_spacing(lo, hi, log, labels):
    ticks = nice_ticks(lo, hi, log)
    assert all(lo <= t <= hi for t in ticks) and tick_labels(ticks, log) == labels


def windows_of(extremes: WindowExtremes, chunks: list[tuple[int, np.ndarray]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for first, values in chunks:
        for key, steps, v in extremes.add(first + np.arange(len(values)), {"train/loss": values}):
            out.setdefault(key, {}).update(zip(steps.tolist(), v.tolist(), strict=True))
    for key, step, v in extremes.tail():
        out.setdefault(key, {})[step] = v
    return out


def test_window_extremes_span_chunks_and_a_resume_gives_the_same_windows():
    n, every = 100, 7
    values = noisy_loss(n, seed=1).astype(np.float64)
    cuts = [0, 3, 4, 15, 16, 30, 41, 42, 63, 70, 88, 100]  # chunk boundaries on and off the window's
    chunks = [(a, values[a:b]) for a, b in itertools.pairwise(cuts)]
    whole = windows_of(WindowExtremes(every), chunks)
    last = [s for s in range(n) if (s + 1) % every == 0]
    expected_max = {s: values[s + 1 - every : s + 1].max() for s in last} | {n: values[98:].max()}
    expected_min = {s: values[s + 1 - every : s + 1].min() for s in last} | {n: values[98:].min()}
    assert whole == {"train/loss_max": expected_max, "train/loss_min": expected_min}
    # stopped at step 45 (in window [42, 49)); the resume sees steps 42..44 from the store only
    resumed = WindowExtremes(every)
    resumed.seed(np.arange(42, 45), {"train/loss": values[42:45]})
    later = windows_of(resumed, [(45, values[45:60]), (60, values[60:])])
    assert later["train/loss_max"] == {s: v for s, v in expected_max.items() if s >= 45}
    assert later["train/loss_min"] == {s: v for s, v in expected_min.items() if s >= 45}


def test_plot_artifact_of_a_run_shows_a_one_step_spike(tmp_path, mlflow_template):
    """20,000 steps through the real Run and sink: plots/curves.png is a 1200 x 900 PNG whose loss panel has
    exactly one pixel column reaching the spike's height."""
    uri = new_store(tmp_path, mlflow_template)
    cfg = compose_config([f"tracking.uri={uri}", "tracking.system_metrics=false", "tracking.run_name=spike"])
    loss = noisy_loss(20_000)
    loss[12_345] = SPIKE
    with Run(cfg) as run:
        for first in range(0, 20_000, 1000):
            part = loss[first : first + 1000]
            values = {"train/loss": part, "train/grad_norm": 2 * part, "train/lr": np.full(1000, 1e-3, np.float32)}
            run.sink.submit(Chunk(first, values, t_start=1.0, t_end=2.0))
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == [ARTIFACT]
    png = matplotlib.image.imread(client.download_artifacts(run.run_id, ARTIFACT, str(tmp_path)))
    mlflow.set_tracking_uri(None)
    assert png.shape[:2] == (900, 1200)
    blue = (png[..., 2] > 0.5) & (png[..., 0] < 0.4)  # matplotlib's C0 (#1f77b4) and its antialiased edges
    top_panel = blue[:300]
    tops = np.where(top_panel.any(axis=0), top_panel.argmax(axis=0), 300)  # highest drawn row per pixel column
    drawn = np.flatnonzero(tops < 300)
    assert len(drawn) > 900  # the curve spans the panel's width
    high = drawn[tops[drawn] < np.median(tops[drawn]) - 100]  # columns reaching far above the band of the rest
    assert 1 <= len(high) <= 2 and np.ptp(high) <= 1  # the spike's column (antialiasing may touch its neighbour)


@pytest.mark.slow  # 11-22 s: the fast suite stays near 10 minutes (make test-slow runs it)
def test_real_runs_log_window_extremes_and_the_plot_through_a_resume(tmp_path, mlflow_template):
    """53 steps with tracking.window_extremes=10, then the run resumed to 77 steps: the windows are each 10
    steps' min and max of the logged train/loss; the first run's partial window (50..52, logged at its end
    step 53) is replaced by the whole window 50..59 once the resume runs it."""
    from trainer.train import train

    uri = new_store(tmp_path, mlflow_template)
    base = [f"tracking.uri={uri}", "data.n_samples=256", "trainer.progress=false", "tracking.system_metrics=false"]
    first = [*base, "trainer.max_steps=53", "tracking.window_extremes=10", "tracking.run_name=windows"]
    train(compose_config(first), overrides=first, output_dir=tmp_path / "run")
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    run_id = run.info.run_id

    def points(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    assert sorted(points("train/loss_max")) == [9, 19, 29, 39, 49, 53]
    resume = [*base, f"resume={tmp_path / 'run'}", "trainer.max_steps=77"]
    train(compose_config(resume), overrides=resume, output_dir=tmp_path / "resumed")  # not the cwd: the repo
    loss = points("train/loss")
    assert sorted(loss) == list(range(77))
    values = np.array([loss[s] for s in range(77)])
    ends = [9, 19, 29, 39, 49, 59, 69]
    for key, fn in (("train/loss_max", np.max), ("train/loss_min", np.min)):
        expected = {s: fn(values[s - 9 : s + 1]) for s in ends} | {77: fn(values[70:])}
        assert points(key) == pytest.approx(expected, rel=1e-6), key
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr_max")}
    assert sorted(lr) == [*ends, 77]
    png = matplotlib.image.imread(client.download_artifacts(run_id, ARTIFACT, str(tmp_path / "dl")))
    assert png.shape[:2] == (900, 1200) and (png[..., :3] < 0.9).mean() > 0.01
    mlflow.set_tracking_uri(None)


def test_window_extremes_must_be_a_window(tmp_path):
    from trainer.config import TrainerError, check

    assert compose_config([]).tracking.window_extremes is None  # off unless asked for
    with pytest.raises(TrainerError, match=r"tracking.window_extremes=1 is invalid: expected null \(off\) or a"):
        check(compose_config(["tracking.window_extremes=1"]))


def test_artifact_name_is_where_the_readme_says():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert ARTIFACT in readme
