"""The LR range test (trainer/lr_find.py) on a problem whose good learning rates were measured: sklearn's digits,
the MLP classifier, Adam, batch 32.

Measured (test_good_range_by_grid, slow; 300-step runs, final val loss): lr 1e-4 1.90, 3e-4 0.68, 1e-3 0.187,
3e-3 0.138, 1e-2 0.196, 3e-2 0.179, 5e-2 0.279, 1e-1 0.68, 3e-1 1.74. Within 1.5x the best: 1e-3..3e-2 (GOOD).
The finder suggested 2.3e-3 (seed 0), 1.0e-2 (seed 1), 8.5e-3 (seed 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import run_cli

GOOD = (1e-3, 3e-2)  # measured: final val loss within 1.5x the best of the grid (module docstring)
DIGITS = ["model=classifier", "loss=sparse_categorical_crossentropy", "tracking.log_model=false",
          "tracking.system_metrics=false"]  # fmt: skip


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    """load_digits as an .npz: x [1797, 64] in [0, 1], y class ids 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=(d.data / 16).astype(np.float32), y=d.target.astype(np.int64))
    return path


def _overrides(path: Path, *more: str) -> list[str]:
    return ["data=numpy", f"data.path={path}", *DIGITS, *more]


def _runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])


def _curve(uri: str, run_id: str, tmp_path: Path) -> dict:
    path = mlflow.MlflowClient(uri).download_artifacts(run_id, "lr_find.json", str(tmp_path))
    return json.loads(Path(path).read_text())


@pytest.mark.slow  # 11-22 s: the fast suite stays near 10 minutes (make test-slow runs it)
def test_suggestion_falls_in_the_measured_good_range(compose_cfg, tracking_uri, digits_npz, tmp_path, capsys):
    from trainer.train import train

    cfg = compose_cfg(_overrides(digits_npz, "lr_find=true"))
    suggestion = train(cfg, output_dir=tmp_path / "out")
    assert GOOD[0] <= suggestion <= GOOD[1]
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lr_find:")]
    assert f"optimizer.lr={suggestion:g}" in line
    [run] = _runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.tags["lr_find"] == "true"
    assert run.data.tags["lr_find.suggestion"] == repr(suggestion)
    client = mlflow.MlflowClient(tracking_uri)
    assert {"lr_find.json", "lr_find.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "out" / "lr_find.png").stat().st_size > 10_000
    curve = _curve(tracking_uri, run.info.run_id, tmp_path)
    assert curve["suggestion"] == suggestion and curve["steps_run"] == 100
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lr"), key=lambda m: m.step)]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(100))  # every step run is logged, once
    assert lrs[0] == pytest.approx(1e-7, rel=1e-5) and lrs[-1] == pytest.approx(10.0, rel=1e-4)
    assert np.allclose(np.diff(np.log(lrs)), math.log(1e8) / 99, rtol=1e-3)  # exponential: even steps in log(lr)


@pytest.mark.slow  # ~10-35 s on 2 cores: the fast suite's time (the slow suite runs it)
def test_divergence_stops_early_and_is_no_error(compose_cfg, tracking_uri, digits_npz, tmp_path):
    """SGD driven to lr 1e4 blows the loss up: the test stops at the chunk where the smoothed loss passed 4x
    its best, the run is FINISHED, and every step it ran (no more) is logged."""
    from trainer.train import train

    cfg = compose_cfg(_overrides(digits_npz, "lr_find=true", "optimizer=sgd", "lr_finder.min_lr=1e-3",
                                 "lr_finder.max_lr=1e4", "lr_finder.steps=100"))  # fmt: skip
    train(cfg, output_dir=tmp_path)
    [run] = _runs(tracking_uri)
    curve = _curve(tracking_uri, run.info.run_id, tmp_path)
    diverged = curve["diverged_at_step"]
    assert run.info.status == "FINISHED" and diverged is not None
    assert diverged < curve["steps_run"] <= diverged + 10 < 100  # the end of the chunk holding it (<= 10 a call)
    assert len(curve["lr"]) == diverged  # the curve ends before the diverged point
    steps = sorted(m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(curve["steps_run"]))
    assert run.data.tags["stopped_by"].startswith("LRCurve at step")


@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_lr_auto_trains_with_the_suggestion_from_fresh_weights(compose_cfg, tracking_uri, digits_npz, tmp_path):
    """optimizer.lr=auto: the finder's run, then the training run with optimizer.lr = the suggestion (its param,
    linked by tags); it starts from the weights a run given that lr from the start has: identical losses."""
    from trainer.train import train

    train(compose_cfg(_overrides(digits_npz, "optimizer.lr=auto", "trainer.max_steps=60")), output_dir=tmp_path / "a")
    finder, trained = _runs(tracking_uri)
    suggestion = float(finder.data.tags["lr_find.suggestion"])
    assert finder.data.tags["lr_find"] == "true" and "lr_find" not in trained.data.tags
    assert trained.data.tags["lr_find.run_id"] == finder.info.run_id
    assert float(trained.data.params["optimizer.lr"]) == suggestion
    assert trained.info.status == "FINISHED" and math.isfinite(trained.data.metrics["train/loss"])
    assert (tmp_path / "a" / "lr_find" / "lr_find.png").is_file()
    train(compose_cfg(_overrides(digits_npz, f"optimizer.lr={suggestion}", "trainer.max_steps=60")),
          output_dir=tmp_path / "b")  # fmt: skip
    plain = _runs(tracking_uri)[-1]
    client = mlflow.MlflowClient(tracking_uri)

    def losses(run) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]

    assert len(losses(trained)) == 60 and losses(trained) == losses(plain)
    from trainer.compare import select_runs

    compared, _ = select_runs(client, compose_cfg().tracking.experiment)  # the finder's run is no training run
    assert {r.info.run_id for r in compared} == {trained.info.run_id, plain.info.run_id}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr_finder.max_lr=1e-8", "error: lr_finder.max_lr=1e-08 is invalid"),
        ("lr_finder.steps=5", "error: lr_finder.steps=5 is invalid"),
        ("lr_finder.divergence=1", "error: lr_finder.divergence=1.0 is invalid"),
        ("optimizer.lr=fast", "error: optimizer.lr='fast' is invalid"),
    ],
)
def test_bad_finder_settings_are_one_line(override, message, tmp_path):
    done = run_cli(["lr_find=true", override, f"tracking.uri=sqlite:///{tmp_path}/m.db"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_lr_find_command(digits_npz, tmp_path):
    """`python -m trainer lr-find ...` is training with lr_find=true: one run, the suggestion on one line."""
    done = run_cli(["lr-find", *_overrides(digits_npz), "trainer.progress=false", "hydra.run.dir=out"], tmp_path)
    assert done.returncode == 0, done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("lr_find: suggested optimizer.lr=")]
    suggestion = float(line.split("optimizer.lr=")[1].split()[0])
    assert GOOD[0] <= suggestion <= GOOD[1]
    [run] = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert run.data.tags["lr_find"] == "true" and (tmp_path / "out" / "lr_find.png").is_file()


@pytest.mark.slow
def test_good_range_by_grid(compose_cfg, digits_npz, tmp_path):
    """The measurement behind GOOD: 300-step runs over a grid; the lrs whose final val loss is within 1.5x the
    best span GOOD, and the finder's suggestion lies inside that span."""
    from trainer.train import train

    grid = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    loss = {lr: train(compose_cfg(_overrides(digits_npz, f"optimizer.lr={lr}", "trainer.max_steps=300")),
                      output_dir=tmp_path / str(lr)) for lr in grid}  # fmt: skip
    good = [lr for lr in grid if loss[lr] <= 1.5 * min(loss.values())]
    assert (min(good), max(good)) == GOOD, loss
    suggestion = train(compose_cfg(_overrides(digits_npz, "lr_find=true")), output_dir=tmp_path / "find")
    assert min(good) <= suggestion <= max(good)
