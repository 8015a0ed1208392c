"""optimizer.use_ema: the logged model holds the moving average of the weights, computed by hand here on
TensorFlow's GradientTape introduction (x = 2, y = 3, w = 0.5, b = 1, squared loss, SGD lr 0.01)."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest

from trainer.train import train

STEPS, MOMENTUM, LR = 6, 0.5, 0.01


def _by_hand() -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """(w, b) after each SGD step, and Keras' average of them: the first step's weights, then
    average = momentum * average + (1 - momentum) * weights."""
    w, b, path = 0.5, 1.0, []
    for _ in range(STEPS):
        r = 3.0 - (2.0 * w + b)  # d(r^2)/dw = -4r, d(r^2)/db = -2r
        w, b = w + LR * 4 * r, b + LR * 2 * r
        path.append((w, b))
    avg = np.array(path[0])
    for point in path[1:]:
        avg = MOMENTUM * avg + (1 - MOMENTUM) * np.array(point)
    return path, (float(avg[0]), float(avg[1]))


def _logged_weights(uri: str, tmp_path, name: str) -> tuple[float, float, dict]:
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               f"attributes.run_name = '{name}'")  # fmt: skip
    local = client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path / name))
    w, b = (float(np.ravel(v.numpy())[0]) for v in keras.saving.load_model(local).weights)  # a Dense's kernel, bias
    return w, b, run.data.tags


def _settings(ema: str) -> list[str]:
    return ["experiment=tape_example", "trainer.print_gradients=false", f"optimizer.use_ema={ema}",
            f"optimizer.ema_momentum={MOMENTUM}"]  # fmt: skip


def test_the_logged_model_holds_the_moving_average_of_the_weights(tmp_path, compose_cfg):
    path, average = _by_hand()
    got = {}
    for name, ema in (("plain", "false"), ("ema", "true")):
        overrides = [*_settings(ema), f"trainer.max_steps={STEPS}", f"tracking.run_name={name}"]
        cfg = compose_cfg(overrides)
        train(cfg, overrides=overrides, output_dir=tmp_path / name)
        got[name] = _logged_weights(str(cfg.tracking.uri), tmp_path, name)
    assert got["plain"][:2] == pytest.approx(path[-1], rel=1e-5)  # without: the last step's weights
    assert got["ema"][:2] == pytest.approx(average, rel=1e-5)  # with: their average, by hand
    assert got["ema"][:2] != pytest.approx(path[-1], rel=1e-3)
    assert got["ema"][2]["weights"] == "moving average (optimizer.use_ema)" and "weights" not in got["plain"][2]


def test_the_average_is_checkpointed_and_a_resume_continues_it(tmp_path, compose_cfg):
    """3 steps, then the run resumed to 6: the logged model is the 6-step average by hand. The run's end put the
    averages into the weights for its model; the resume restores the checkpoint's raw weights and averages."""
    first = [*_settings("true"), f"trainer.max_steps={STEPS // 2}", "tracking.run_name=ema"]
    cfg = compose_cfg(first)
    train(cfg, overrides=first, output_dir=tmp_path / "run")
    resume = [f"tracking.uri={cfg.tracking.uri}", f"resume={tmp_path / 'run'}", f"trainer.max_steps={STEPS}"]
    train(compose_cfg(resume), overrides=resume, output_dir=tmp_path / "resumed")
    assert _logged_weights(str(cfg.tracking.uri), tmp_path, "ema")[:2] == pytest.approx(_by_hand()[1], rel=1e-6)
