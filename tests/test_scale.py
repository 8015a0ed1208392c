"""Beyond one plain float32 step: gradient accumulation and mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer import losses
from trainer.data import regression
from trainer.loop import PER_VARIABLE, StepLoop
from trainer.models import MLP, Linear

DATA = regression(n_samples=256, n_features=4, val_fraction=0.0, seed=2)


def linear_loop(batch_size: int, accumulate: int) -> StepLoop:
    keras.utils.set_random_seed(0)
    model = Linear(units=1)
    return StepLoop(model, losses.mse, keras.optimizers.SGD(0.1), DATA.x_train, DATA.y_train, batch_size,
                    seed=5, accumulate_steps=accumulate)  # fmt: skip


def test_accumulating_4_batches_of_8_is_one_batch_of_32():
    """Same examples per update (the order is a function of the batch number), same mean gradient."""
    big, small = linear_loop(32, 1), linear_loop(8, 4)
    a, b = big.run(20), small.run(20)  # 20 updates: 2.5 epochs of 256 examples
    np.testing.assert_allclose(b["train/loss"].numpy(), a["train/loss"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(b[PER_VARIABLE].numpy(), a[PER_VARIABLE].numpy(), rtol=1e-5)
    for x, y in zip(big.model.weights, small.model.weights, strict=True):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-5, atol=1e-7)
    assert int(small.step.numpy()) == 20


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_reports_unscaled_gradient_norms(policy):
    def loop_for(p: str) -> StepLoop:
        keras.config.set_dtype_policy(p)
        keras.utils.set_random_seed(0)
        optimizer = keras.optimizers.Adam(1e-2)
        if p == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return StepLoop(MLP(hidden=[16], units=1), losses.mse, optimizer, DATA.x_train, DATA.y_train, 32)

    try:
        reference, mixed = loop_for("float32"), loop_for(policy)
    finally:
        keras.config.set_dtype_policy("float32")
    assert mixed.model.layers[0].compute_dtype == policy.removeprefix("mixed_")
    first_ref, first = reference.run(1), mixed.run(1)
    # the first step sees the same weights and batch: norms agree to the half type's precision, not x2^15
    np.testing.assert_allclose(first[PER_VARIABLE].numpy(), first_ref[PER_VARIABLE].numpy(), rtol=0.05)
    losses_mixed = mixed.run(200)["train/loss"].numpy()
    assert np.all(np.isfinite(losses_mixed))
    assert losses_mixed[-20:].mean() < 0.3 * float(first["train/loss"].numpy()[0])


def _cli_losses(tmp_path, name: str, *args: str) -> np.ndarray:
    import os
    import subprocess
    import sys

    import mlflow

    uri = f"sqlite:///{tmp_path}/{name}.db"
    cmd = [sys.executable, "-m", "trainer", "model=mlp", "data.n_samples=640", "trainer.max_steps=40",
           "trainer.batch_size=32", "tracking.log_model=false", f"tracking.uri={uri}",
           f"hydra.run.dir={tmp_path}/{name}", *args]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return np.array([m.value for m in history])


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device_on_the_same_global_batch(tmp_path):
    single = _cli_losses(tmp_path, "single")
    mirrored = _cli_losses(tmp_path, "mirrored", "trainer.strategy=mirrored", "trainer.logical_cpus=2")
    assert len(single) == len(mirrored) == 40
    np.testing.assert_allclose(mirrored, single, rtol=1e-4, atol=1e-6)


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_two_processes_on_loopback_one_run_same_weights(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import mlflow
    import tensorflow as tf

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for i in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}  # fmt: skip
        cmd = [sys.executable, "-m", "trainer", "trainer.strategy=multi_worker", "model=mlp", "data.n_samples=512",
               "trainer.max_steps=30", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/w{i}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(30))

    def weights(directory) -> list[np.ndarray]:
        reader = tf.train.load_checkpoint(str(directory))
        return [reader.get_tensor(n) for n in sorted(reader.get_variable_to_shape_map()) if n.startswith("model/")]

    chief, other = weights(tmp_path / "w0" / "checkpoints"), weights(tmp_path / "w1" / "checkpoints-worker1")
    assert len(chief) == len(other) > 0
    for a, b in zip(chief, other, strict=True):
        np.testing.assert_array_equal(a, b)
