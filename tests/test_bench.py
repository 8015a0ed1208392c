"""scripts/bench: its competitors draw the trainer's own batches; smoke runs end to end; the exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from conftest import compose_config
from trainer.config import build
from trainer.data import Dataset
from trainer.loop import MIN_EPOCH_FOR_CUTS, StepLoop

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BENCH = SCRIPTS / "bench"
sys.path.insert(0, str(SCRIPTS))  # the bench is a package of scripts/, not of the installed trainer

from bench import competitors  # noqa: E402
from bench.harness import JOBS, JobContext, fresh_model, fresh_optimizer  # noqa: E402


class Recorder(keras.Model):
    """A linear model of feature 1 that writes the row ids (feature 0) of every training batch it sees into `seen`."""

    last: Recorder | None = None  # the competitors build their own model: the test reads it here

    def __init__(self, steps: int, batch: int) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.seen = tf.Variable(tf.fill([steps, batch], -1), trainable=False)
        self.calls = tf.Variable(0, trainable=False)
        Recorder.last = self

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training:
            self.seen[self.calls].assign(tf.cast(x[:, 0], tf.int32))
            self.calls.assign_add(1)
        return self.dense(x[:, 1:])  # not the ids: large inputs would make SGD diverge, and the trainer stop

    def batches(self) -> np.ndarray:
        assert int(self.calls.numpy()) == self.seen.shape[0]  # one training call per step, no more
        return self.seen.numpy()


def order_context(tmp_path: Path, per_epoch: int, steps: int, template: Path) -> JobContext:
    """A job of `per_epoch` batches of 4 whose rows carry their own index, the model a Recorder."""
    batch = 4
    n = per_epoch * batch + 3  # a ragged tail, dropped by every loop
    x = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    cfg = compose_config([f"trainer.batch_size={batch}", "trainer.seed=7", "optimizer=sgd"])
    OmegaConf.set_struct(cfg, False)
    cfg.model = OmegaConf.create({"_target_": f"{__name__}.Recorder", "steps": steps, "batch": batch})
    shutil.copyfile(template, tmp_path / "template.db")  # naive's fresh stores are copies of it
    return JobContext(JOBS["tape"], cfg, Dataset(x, np.zeros((n, 1), np.float32), None, None), tmp_path)


@pytest.mark.filterwarnings("ignore:.*shuffle=True")  # fit's default, moot for a dataset
@pytest.mark.parametrize("per_epoch", [5, MIN_EPOCH_FOR_CUTS + 2])  # new epochs tested per step; chunks cut at them
def test_competitors_see_the_trainers_batches(tmp_path: Path, mlflow_template: Path, per_epoch: int) -> None:
    """Row for row, over three epochs' boundaries (two for the long epochs): the trainer's StepLoop, naive,
    keras-fit (steps_per_execution 3) and bare are fed the same batches in the same order."""
    steps = per_epoch * 2 + 3 if per_epoch < MIN_EPOCH_FOR_CUTS else per_epoch + 5
    ctx = order_context(tmp_path, per_epoch, steps, mlflow_template)
    model = fresh_model(ctx)
    loop = StepLoop(model, build(ctx.cfg.loss), fresh_optimizer(ctx, steps), ctx.data.x_train, ctx.data.y_train,
                    ctx.batch, seed=ctx.seed)  # fmt: skip
    assert loop.cut_at_epochs == (per_epoch >= MIN_EPOCH_FOR_CUTS)
    loop.run(steps)
    trainer = model.batches()
    epochs = [trainer[e * per_epoch : (e + 1) * per_epoch] for e in range(2)]
    assert sorted(epochs[0].ravel()) == sorted(set(epochs[0].ravel()))  # an epoch draws each row at most once
    assert not np.array_equal(epochs[0], epochs[1][: len(epochs[0])])  # and the next epoch reshuffles
    assert not np.array_equal(epochs[0].ravel(), np.sort(epochs[0].ravel()))  # shuffled, not in row order

    competitors.run_naive(ctx, steps)
    np.testing.assert_array_equal(Recorder.last.batches(), trainer, err_msg="naive")
    competitors.keras_fit(3)(ctx, steps)
    np.testing.assert_array_equal(Recorder.last.batches(), trainer, err_msg="keras-fit")
    competitors.run_bare(ctx, steps)
    np.testing.assert_array_equal(Recorder.last.batches(), trainer, err_msg="bare")


def bench(tmp_path: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,  # anything it writes by mistake lands here, not in the repo
    )


@pytest.mark.slow
def test_bench_quick_prints_every_competitor(tmp_path: Path) -> None:
    """--no-targets: the targets are reported, a missed one among them, and the run still exits 0."""
    out = tmp_path / "bench.json"
    proc = bench(tmp_path, "--quick", "--jobs", "tape", "--json", str(out), "--no-targets", "--floor", "tape:bare=1e9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("naive", "keras-fit", "bare", "ours"):
        assert name in proc.stdout, proc.stdout
    assert "MISS tape: ours >= 1e+09x bare" in proc.stdout, proc.stdout
    assert "tape: CLI launch->step 0 <= import tensorflow + 2 s" in proc.stdout, proc.stdout
    payload = json.loads(out.read_text())
    (job,) = payload["jobs"]
    assert job["cli"]["import_tf_s"] > 0 and job["cli"]["first_step_s"] > 0
    assert len(job["cli"]["import_tf_runs"]) == len(job["cli"]["first_step_runs"]) == 1
    gates = [t for t in payload["targets"] if t["gate"]]
    assert {t["line"].split(":")[0] for t in gates} == {"tape"}
    assert [t["ok"] for t in gates if "1e+09x bare" in t["line"]] == [False]


@pytest.mark.slow
def test_bench_exits_1_when_a_target_is_missed(tmp_path: Path) -> None:
    """A floor no loop can reach: the run reports it as MISS and exits 1 (the other targets may pass or not)."""
    proc = bench(tmp_path, "--quick", "--jobs", "tape", "--steps", "40", "--naive-steps", "6",
                 "--floor", "tape:naive=1e9")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "MISS tape: ours >= 1e+09x naive" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~7 s, a whole process: the fast suite stays under 10 minutes
def test_bench_rejects_a_floor_it_cannot_check(tmp_path: Path) -> None:
    proc = bench(tmp_path, "--floor", "tape:bar=1", timeout=120)
    assert proc.returncode == 2
    assert "--floor 'tape:bar=1': give JOB:COMPETITOR=MIN" in proc.stderr


@pytest.mark.slow
def test_bench_sink_counts_every_point(tmp_path: Path) -> None:
    """--sink: both arms per grad-norm mode ran, and the store holds exactly the points each logged."""
    steps = 60
    out = tmp_path / "sink.json"
    proc = bench(tmp_path, "--sink", "--jobs", "tape", "--steps", str(steps), "--repeats", "1", "--json", str(out),
                 "--no-targets", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = json.loads(out.read_text())["sink"]["arms"]
    # the tape example has two variables (w, b): loss, lr, global norm, and per_variable adds 2 more a step
    assert arms["global"]["points"] >= 3 * steps
    assert arms["per_variable"]["points"] - arms["global"]["points"] == 2 * steps
    for arm in arms.values():
        assert arm["points_quiet"] < arm["points"] / 10  # log_every=steps: one step's points and the summary
        assert len(arm["overhead"]) == 1
    assert "what the store adds" in proc.stdout


@pytest.mark.slow
def test_bench_cost_runs_both_arms_on_the_cnn_images(tmp_path: Path) -> None:
    """--cost on the cnn job: its images are written, both arms ran every step, and the arms differ by exactly
    what the overrides change: global norms only drop the 8 per-variable norms of the conv net, every step."""
    steps = 12
    out = tmp_path / "cost.json"
    proc = bench(tmp_path, "--cost", "tracking.log_grad_norms=global", "--jobs", "cnn", "--steps", str(steps),
                 "--repeats", "1", "--json", str(out), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads(out.read_text())["cost"]
    assert cost["overrides"] == ["tracking.log_grad_norms=global"] and len(cost["ratios"]) == 1
    # conv_0, conv_1 kernels (no bias before BatchNorm), bn_0, bn_1 gamma and beta, the head kernel and bias
    assert cost["points"]["job"] - cost["points"]["with overrides"] == 8 * steps
    assert "steps/s with the overrides / without" in proc.stdout


def test_stream_file_is_the_regression_written_in_blocks(tmp_path: Path) -> None:
    """--stream's file: x [rows, 32] and y [rows, 1] float32, `gb` GiB together, several blocks (the last one
    short), and y a linear function of x plus noise of std 0.1, as trainer.data.regression makes it."""
    from bench.stream import FEATURES, NOISE, WRITE_ROWS, write_regression

    files = write_regression(tmp_path / "d", 0.09)
    x, y = np.load(files.x, mmap_mode="r"), np.load(files.y, mmap_mode="r")
    assert files.rows == int(0.09 * 2**30) // 132 == 732_096 and files.rows > 2 * WRITE_ROWS
    assert x.shape == (files.rows, FEATURES) and y.shape == (files.rows, 1)
    assert x.dtype == y.dtype == np.float32
    size = files.x.stat().st_size + files.y.stat().st_size
    assert 0.09 * 2**30 <= size < 0.09 * 2**30 + 1024  # the data, and the two headers
    tail = np.asarray(x[-1000:])
    assert abs(tail.std() - 1.0) < 0.05  # the short last block was written too, not left as zeros
    design = np.hstack([np.asarray(x, np.float64), np.ones((files.rows, 1))])
    _, residual, *_ = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)
    assert abs(np.sqrt(residual[0] / files.rows) - NOISE) < 0.002


@pytest.mark.slow  # ~7 s, a whole process: the fast suite stays under 10 minutes
def test_bench_stream_rejects_steps_keras_cannot_split(tmp_path: Path) -> None:
    proc = bench(tmp_path, "--stream", "--steps", "300", timeout=120)
    assert proc.returncode == 2
    assert "--steps 300: --stream needs a multiple of 400 (4 epochs of spe (1, 10, 100))" in proc.stderr


@pytest.mark.slow
def test_bench_stream_races_ours_and_keras_on_one_file(tmp_path: Path) -> None:
    """--stream on a 10 MB file: a row per size, ours and each spe's Keras fit ran the same 200 steps, each in its
    own process with its own peak RSS; --no-targets reports the targets and exits 0; the file is removed."""
    out, files = tmp_path / "stream.json", tmp_path / "files"
    proc = bench(tmp_path, "--stream", "--quick", "--stream-gb", "0.01", "--steps", "200", "--stream-dir", str(files),
                 "--json", str(out), "--no-targets", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(out.read_text())["stream"]
    assert [size["format"] for size in sizes] == ["numpy", "parquet"]  # the same rows, as .npy and as Parquet
    for size in sizes:
        assert size["gb"] == 0.01 and size["rows"] == 81_344 and size["steps"] == 200
        assert [r["steps"] for r in size["ours"]] == [200]
        assert {spe: [r["steps"] for r in runs] for spe, runs in size["keras"].items()} == {"1": [200], "50": [200]}
        for run in [*size["ours"], *size["keras"]["1"], *size["keras"]["50"]]:
            assert run["rate"] > 0
            assert 300 < run["usage"]["peak_rss_mb"] < 3000  # TensorFlow's own ~0.7 GB, and not the parent's
            assert run["usage"]["peak_anon_mb"] <= run["usage"]["peak_rss_mb"]
    rows = [line for line in proc.stdout.splitlines() if "81,344" in line]
    assert len(rows) == 2 and all("200 / 200" in row and "(spe=" in row for row in rows)
    assert "numpy" in rows[0] and "parquet" in rows[1]
    for name in ("0.01 GiB", "0.01 GiB parquet"):
        assert f"stream {name}: ours >= 1x keras-fit best, same pipeline:" in proc.stdout
        assert f"stream {name}: ours' peak RSS < 1.5 GB:" in proc.stdout
    assert not any(files.iterdir())  # no --keep: the size's files are gone, the given directory stays


@pytest.mark.slow
def test_bench_step_races_sam_through_the_contract_against_a_hand_written_loop(tmp_path: Path) -> None:
    """--step: both competitors run SAM on the mlp job; the ratio and its target are printed, the JSON holds both."""
    out = tmp_path / "step.json"
    proc = bench(tmp_path, "--step", "--quick", "--json", str(out), "--no-targets", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step job sam (N=1000): hand-written " in proc.stdout and "ours / hand-written" in proc.stdout, proc.stdout
    assert "sam: ours / hand-written" in proc.stdout and ">= 0.95x" in proc.stdout
    step = json.loads(out.read_text())["step"]
    assert set(step["rates"]) == {"hand-written", "ours"} and all(v > 0 for v in step["rates"].values()), step
