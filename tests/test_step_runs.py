"""Built-in steps run from YAML alone through the real CLI: the GAN (modes covered, kill -9 and resume bitwise),
the physics-informed oscillator (error against the analytic solution), the custom-step example, bad settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

import trainer.models  # noqa: F401 (registers the built-in models with Keras, for load_model)
from conftest import compose_config
from trainer.config import TrainerError
from trainer.train import train

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def cli(tmp_path: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "trainer.progress=false",
           *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd or tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finished(proc: subprocess.Popen, timeout: int = 240) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out + err


def only_run(tmp_path: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def modes_covered(samples: np.ndarray, modes: int = 8, radius: float = 2.0, within: float = 0.3) -> tuple[int, float]:
    """Modes with at least 2% of the samples within `within` of their centre, and the share of samples near any."""
    angles = 2 * np.pi * np.arange(modes) / modes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    dist = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1)
    near = dist.min(1) < within
    counts = np.bincount(dist.argmin(1)[near], minlength=modes)
    return int((counts >= 0.02 * len(samples)).sum()), float(near.mean())


@pytest.mark.slow  # ~25 s: 3,000 GAN steps through the CLI (make test-slow runs it)
def test_gan_from_one_file_covers_the_ring_and_logs_each_optimizer(tmp_path):
    out = finished(cli(tmp_path, "experiment=gan", "trainer.max_steps=3000", "hydra.run.dir=run"))
    assert "val d_loss" in out
    client, run = only_run(tmp_path)
    generator = keras.models.load_model(tmp_path / "run" / "model.keras")
    samples = generator(tf.random.stateless_normal([4000, 8], [1, 2])).numpy()
    covered, quality = modes_covered(samples)
    print(f"GAN: {covered} of 8 modes covered, {quality:.2%} of samples within 0.3 of a mode")
    assert covered >= 7 and quality > 0.6
    metrics = set(run.data.metrics)
    for player in ("generator_optimizer", "discriminator_optimizer"):
        assert {f"train/{player}/{m}" for m in ("loss", "lr", "grad_norm")} <= metrics
        assert len(client.get_metric_history(run.info.run_id, f"train/{player}/loss")) == 3000
    assert {"train/loss", "train/grad_norm", "val/loss", "val/d_loss", "val/g_loss"} <= metrics
    assert any(m.startswith("train/grad_norm_by_var/generator/") for m in metrics)
    assert any(m.startswith("train/grad_norm_by_var/discriminator/") for m in metrics)


@pytest.mark.slow  # ~45 s: three CLI runs
def test_gan_killed_with_sigkill_and_resumed_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    common = ["step=gan", "trainer.max_steps=1200", "trainer.checkpoint_every=100", "trainer.steps_per_loop=50",
              "trainer.deterministic=true", "tracking.log_model=false", "data.n_samples=2048"]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    finished(cli(tmp_path / "a", *common, "hydra.run.dir=run"))
    proc = cli(tmp_path / "b", *common[:1], *common[2:], "trainer.max_steps=100000", "hydra.run.dir=run")
    durable = tmp_path / "b" / "run" / "checkpoints" / "durable.json"
    deadline = time.time() + 180
    while time.time() < deadline:
        if durable.exists() and json.loads(durable.read_text() or "{}").get("step", 0) >= 300:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    stopped = json.loads(durable.read_text())["step"]
    assert 300 <= stopped < 1200
    finished(cli(tmp_path / "b", f"resume={tmp_path / 'b' / 'run'}", "trainer.max_steps=1200"))
    client, run = only_run(tmp_path / "b")
    assert run.data.tags["resumed_at_step"] != "0"
    history = client.get_metric_history(run.info.run_id, "train/generator_optimizer/loss")
    assert sorted(m.step for m in history) == list(range(1200))  # no hole, no repeat

    def final(d: Path) -> dict[str, np.ndarray]:
        reader = tf.train.load_checkpoint(str(d / "run" / "checkpoints"))
        names = [n for n in reader.get_variable_to_shape_map() if n.startswith(("model/", "step_state/"))]
        return {n: reader.get_tensor(n) for n in names}

    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert len(a) > 10 and a.keys() == b.keys()
    assert any("discriminator_optimizer" in n for n in a)  # both optimizers' slots are in the checkpoint
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise


@pytest.mark.slow  # ~17 s: the whole experiment, timed
def test_pinn_experiment_solves_the_oscillator_within_one_percent_in_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    finished(cli(tmp_path, "experiment=pinn", "hydra.run.dir=run"))
    elapsed = time.perf_counter() - t0
    _, run = only_run(tmp_path)
    error = run.data.metrics["val/rel_l2"]
    print(f"PINN: relative L2 error {error:.2e} in {elapsed:.1f} s")
    assert error < 1e-2 and elapsed < 60
    model = keras.models.load_model(tmp_path / "run" / "model.keras")  # the logged network is u(t) itself
    t = np.linspace(0, 2 * np.pi, 200, dtype=np.float32)[:, None]
    u = model(t).numpy()
    assert np.linalg.norm(u - np.sin(t)) / np.linalg.norm(np.sin(t)) < 1e-2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["step=gan", "model=mlp"], "step trainer.steps.GAN takes no model"),
        (["step=oscillator", "data=oscillator"], "step trainer.steps.Oscillator takes no loss"),
        (["step=sam", "step.rho=-1"], "step.rho=-1"),
        (["step=adversarial", "step.clip=[1,0]"], "step.clip=[1.0, 0.0] is invalid"),
        (["step._target_=argparse.Namespace", "~model", "~loss", "~optimizer"], "is a Namespace, not a"),
        (["step._target_=nosuch.Step"], "step._target_='nosuch.Step' cannot be imported"),
        (["experiment=pinn", "model=null"], "model=null: a config group is left out with ~model"),
    ],
)
def test_bad_step_settings_are_one_line_before_training(tmp_path, args, message):
    if "model=null" not in args:  # in-process: the CLI prints a TrainerError as its one line (test_errors.py)
        with pytest.raises(TrainerError) as caught:
            train(compose_config([*args, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "trainer.max_steps=5"]))
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "mlflow.db").exists()  # refused before any run was made
        return
    proc = cli(tmp_path, *args, "trainer.max_steps=5")  # Hydra's own refusal, through the CLI's one line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert message in err and "Traceback" not in err, err


def _losses(tmp_path: Path, name: str, *args: str, key: str = "train/loss") -> np.ndarray:
    (tmp_path / name).mkdir()
    finished(cli(tmp_path / name, "trainer.max_steps=30", "tracking.log_model=false", "hydra.run.dir=run", *args))
    client, run = only_run(tmp_path / name)
    return np.array([m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)])


@pytest.mark.slow
def test_a_steps_gradients_are_all_reduced_under_mirrored_as_on_one_device(tmp_path):
    """Two logical CPUs, each half the global batch: Ops all-reduces every gradient (and SAM's perturbation sees
    the global one), so SAM's losses are those of one device on the whole batch. A GAN runs too, every step of both
    optimizers logged; its losses differ from one device's by design (each replica draws its own noise)."""
    sam = ["step=sam", "model=mlp", "data.n_samples=640", "trainer.batch_size=32"]
    single = _losses(tmp_path, "single", *sam)
    mirrored = _losses(tmp_path, "mirrored", *sam, "trainer.strategy=mirrored", "trainer.logical_cpus=2")
    assert len(single) == len(mirrored) == 30
    np.testing.assert_allclose(mirrored, single, rtol=1e-4, atol=1e-6)
    for player in ("generator_optimizer", "discriminator_optimizer"):
        gan = _losses(tmp_path, f"gan-{player}", "step=gan", "data.n_samples=640", "trainer.batch_size=32",
                      "trainer.strategy=mirrored", "trainer.logical_cpus=2", key=f"train/{player}/loss")  # fmt: skip
        assert len(gan) == 30 and np.all(np.isfinite(gan))


@pytest.mark.parametrize("step", ["step=gan", "step=sam"])
def test_mixed_float16_scales_every_optimizer_of_a_step(tmp_path, step):
    cfg = compose_config([step, "trainer.precision=mixed_float16", "trainer.max_steps=60", "data.n_samples=1024",
                          "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])  # fmt: skip
    train(cfg, output_dir=tmp_path)
    client, run = only_run(tmp_path)
    keys = ["train/generator_optimizer/loss", "train/discriminator_optimizer/loss"] if "gan" in step else ["train/loss"]
    for key in keys:
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert len(values) == 60 and np.all(np.isfinite(values))
    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints"))
    scales = [n for n in reader.get_variable_to_shape_map() if "dynamic_scale" in n or "loss_scale" in n.lower()]
    assert len(scales) >= (2 if "gan" in step else 1), sorted(reader.get_variable_to_shape_map())[:20]
