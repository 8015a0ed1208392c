"""Callbacks: the user's own actions between chunks (trainer.callbacks), the interface the built-in duties use,
early stopping's restore_best, and the process-wide state a run changes and gives back. Real training, a real
SQLite store, the real CLI for the errors."""

from __future__ import annotations

import json
import signal
import sys

import keras
import mlflow
import numpy as np
import pytest

from conftest import REPO_ROOT, compose_config, new_store
from trainer.callbacks import Callback, Context, StepArrays
from trainer.config import TrainerError
from trainer.train import train

TAPE = ["experiment=tape_example", "tracking.log_model=false"]  # loss 0.81**step: every value known in advance
QUICK = ["tracking.log_model=false", "data.n_samples=512"]


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch):
    """`python -m trainer` run in examples/ imports my_callbacks from there; in-process, the same directory."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "examples"))


def only_run(uri: str):
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    return run


def history(uri: str, run_id: str, key: str) -> dict[int, list[float]]:
    points: dict[int, list[float]] = {}
    for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key):
        points.setdefault(m.step, []).append(m.value)
    return dict(sorted(points.items()))


def losses(uri: str, run_id: str) -> np.ndarray:
    h = history(uri, run_id, "train/loss")
    assert list(h) == list(range(len(h))) and all(len(v) == 1 for v in h.values())
    return np.array([v[0] for v in h.values()])


@pytest.fixture
def store(tmp_path, mlflow_template) -> str:
    return new_store(tmp_path, mlflow_template)


# --- the worked examples --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("every", "steps_per_loop", "points"),
    [("null", 7, [7, 14, 21, 28, 30]),  # at each chunk's end: chunks of 7, the last one short
     (10, 4, [10, 20, 30])],  # every=10 cuts chunks of 4 at 10, 20, 30: exactly those steps
)  # fmt: skip
def test_custom_metric_has_exactly_the_expected_steps(tmp_path, store, every, steps_per_loop, points):
    cfg = compose_config([*TAPE, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=30",
                          f"trainer.steps_per_loop={steps_per_loop}",
                          f"trainer.callbacks=[{{_target_:my_callbacks.MeanLoss,every:{every}}}]"])  # fmt: skip
    train(cfg, output_dir=tmp_path)
    run = only_run(store)
    custom = history(store, run.info.run_id, "custom/mean_loss")
    assert list(custom) == points and all(len(v) == 1 for v in custom.values())  # one point each, no more
    loss = losses(store, run.info.run_id)
    assert len(loss) == 30
    for start, end in zip([0, *points], points, strict=False):  # each point: the mean of the steps since the last
        assert custom[end][0] == pytest.approx(loss[start:end].mean(), rel=1e-12)


def test_stop_at_target_ends_at_the_first_chunk_boundary_below_it(tmp_path, store):
    """The tape example's loss is 0.81**step: below 0.1 from step 11 on, so the chunk [9, 12) is the first
    whose last step is below it, and the run ends at 12 with a checkpoint there."""
    cfg = compose_config([*TAPE, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=100",
                          "trainer.steps_per_loop=3",
                          "trainer.callbacks=[{_target_:my_callbacks.StopAtLoss,target:0.1}]"])  # fmt: skip
    objective = train(cfg, output_dir=tmp_path)
    run = only_run(store)
    loss = losses(store, run.info.run_id)
    first_below = next(b for b in range(3, 101, 3) if loss[b - 1] < 0.1) if loss[-1] < 0.1 else None
    assert len(loss) == first_below == 12
    assert loss[8] >= 0.1  # the boundary before it was above the target
    assert run.data.tags["stopped_by"] == "StopAtLoss at step 12"
    assert run.info.status == "FINISHED"
    assert history(store, run.info.run_id, "train/final_loss") == {12: [pytest.approx(objective)]}
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.index")) == ["ckpt-0.index",
                                                                                       "ckpt-12.index"]  # fmt: skip


# --- the interface -------------------------------------------------------------------------------------
class Recorder(Callback):
    """What the controller hands a callback, round by round."""

    def __init__(self) -> None:
        self.begun, self.rounds, self.ended, self.loss = [], [], [], []

    def on_train_begin(self, ctx: Context) -> None:
        self.begun.append((ctx.step, ctx.total_steps))

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        self.rounds.append((arrays.first_step, step, arrays.steps))
        self.loss.append(arrays["train/loss"])

    def on_train_end(self, ctx: Context, result) -> None:
        self.ended.append(result)


def test_callbacks_see_every_step_once_with_its_own_values(tmp_path, store):
    """Automatic steps per loop (chunks of 10, 10, then timed) cut at the evaluations: the rounds tile the run."""
    rec = Recorder()
    cfg = compose_config([*QUICK, f"tracking.uri={store}", "trainer.progress=false", "model=mlp",
                          "model.hidden=[8]", "trainer.max_steps=300", "trainer.eval_every=50"])  # fmt: skip
    train(cfg, output_dir=tmp_path, callbacks=[rec])
    assert rec.begun == [(0, 300)]
    firsts, ends, counts = zip(*rec.rounds, strict=True)
    assert list(firsts) == [0, *ends[:-1]] and ends[-1] == 300  # contiguous, from 0 to the end
    assert sum(counts) == 300 and all(end - first == n for first, end, n in rec.rounds)
    assert {50, 100, 150, 200, 250} <= set(ends)  # chunks end on the evaluations
    run = only_run(store)
    np.testing.assert_array_equal(np.concatenate(rec.loss), losses(store, run.info.run_id).astype(np.float32))
    [result] = rec.ended
    assert result.steps == 300 and result.val["loss"] == history(store, run.info.run_id, "val/loss")[300][0]


def test_a_failing_callback_fails_the_run_and_still_gets_its_end(tmp_path, store):
    class Failing(Recorder):
        def on_chunk_end(self, ctx, step, arrays):
            super().on_chunk_end(ctx, step, arrays)
            if step >= 6:
                raise RuntimeError("boom")

    rec = Failing()
    cfg = compose_config([*TAPE, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=30",
                          "trainer.steps_per_loop=3"])  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, output_dir=tmp_path, callbacks=[rec])
    assert [end for _, end, _ in rec.rounds] == [3, 6] and rec.ended == [None]
    assert only_run(store).info.status == "FAILED"


# --- process-wide state --------------------------------------------------------------------------------
class Probe(Callback):
    """The process-wide settings as a run sees them while it trains."""

    def on_chunk_end(self, ctx, step, arrays):
        self.seen = (sys.getswitchinterval(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                     keras.config.dtype_policy().name)  # fmt: skip
        if getattr(self, "fail", False):
            raise RuntimeError("stop here")


def settings() -> tuple:
    return sys.getswitchinterval(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), \
        keras.config.dtype_policy().name  # fmt: skip


@pytest.mark.parametrize("fail", [False, True], ids=["finished", "failed"])
def test_process_settings_are_set_while_training_and_restored_after(tmp_path, store, fail):
    """Before: a run with trainer.precision=mixed_bfloat16 left Keras' global policy at mixed_bfloat16 for
    every model the process built after it."""
    before = settings()
    assert before[3] == "float32"
    probe = Probe()
    probe.fail = fail
    cfg = compose_config([*QUICK, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=6",
                          "trainer.precision=mixed_bfloat16"])  # fmt: skip
    if fail:
        with pytest.raises(RuntimeError, match="stop here"):
            train(cfg, output_dir=tmp_path, callbacks=[probe])
    else:
        train(cfg, output_dir=tmp_path, callbacks=[probe])
    interval, sigint, sigterm, policy = probe.seen
    assert interval == pytest.approx(2e-4) and interval < before[0] and policy == "mixed_bfloat16"
    assert sigint is not before[1] and sigterm is not before[2] and sigint is sigterm  # the trainer's handler
    assert settings() == before


# --- restore_best, and one val/* point per step -------------------------------------------------------
@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_best_decides_the_final_weights_and_val_has_one_point_per_step(tmp_path, store, restore_best):
    """min_delta=10 counts no evaluation after the first as an improvement while the loss still falls: the
    stopper's best is step 10, and patience 2 stops at 30. Before: restore_best=false restored step 10's
    weights anyway, and val/* had two points at step 30 (the evaluation and the final one)."""
    cfg = compose_config([*QUICK, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=1000",
                          "trainer.eval_every=10", "trainer.early_stopping.patience=2",
                          "trainer.early_stopping.min_delta=10",
                          f"trainer.early_stopping.restore_best={str(restore_best).lower()}"])  # fmt: skip
    objective = train(cfg, output_dir=tmp_path)
    run = only_run(store)
    val = history(store, run.info.run_id, "val/loss")
    assert {step: len(v) for step, v in val.items()} == {10: 1, 20: 1, 30: 1}
    assert run.data.tags["early_stopped_at"] == "30" and run.data.metrics["early_stopping/best_step"] == 10
    assert run.data.metrics["val/loss"] == val[30][0] == objective  # the final value is the run's objective
    if restore_best:
        assert val[30][0] == val[10][0]  # the best evaluation's weights, evaluated again: the same number
    else:
        assert val[30][0] < val[20][0] < val[10][0]  # the last weights, still improving


# --- configuration: errors and trust -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message", "before_tf"),
    [
        ("[{_target_:nosuch.Cb}]", "trainer.callbacks[0]._target_='nosuch.Cb' cannot be imported: "
         "No module named 'nosuch'", True),
        ("[{_target_:my_callbacks.Nope}]", "trainer.callbacks[0]._target_='my_callbacks.Nope' cannot be imported: "
         "module 'my_callbacks' has no attribute 'Nope'", True),
        ("[3]", "trainer.callbacks[0]=3 is invalid: expected a node with a _target_, such as "
         "{_target_: my_pkg.MyCallback}", True),
        ("[{_target_:collections.OrderedDict}]", "trainer.callbacks[0]._target_='collections.OrderedDict' is not "
         "a callback: it has no on_train_begin, on_chunk_end, on_train_end; subclass trainer.callbacks.Callback",
         False),
        ("[{_target_:my_callbacks.MeanLoss,every:-5}]", "trainer.callbacks[0].every=-5 is invalid: expected an "
         "integer >= 1, or null for wherever chunks end", False),  # it made chunks of no steps: a spin forever
        ("[{_target_:my_callbacks.MeanLoss,every:0}]", "trainer.callbacks[0].every=0 is invalid: expected an "
         "integer >= 1, or null for wherever chunks end", False),
    ],
    ids=["no_module", "no_class", "not_a_node", "not_a_callback", "every_negative", "every_zero"],
)  # fmt: skip
@pytest.mark.slow  # 8-22 s of CLI runs: the fast suite stays under 10 minutes (make test-slow runs it)
def test_a_bad_callback_is_one_line(tmp_path, run_cli, mlflow_template, value, message, before_tf):
    proc = run_cli([*TAPE, f"trainer.callbacks={value}", f"tracking.uri={new_store(tmp_path, mlflow_template)}"],
                   REPO_ROOT / "examples", python_flags=["-X", "importtime"])  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines[-1] == f"error: {message}" and "Traceback" not in proc.stderr
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert ("tensorflow" not in imported) == before_tf


def test_run_data_cannot_add_a_callback_and_your_own_config_can(tmp_path, store):
    """resume builds only the callbacks your own config names: a run.json that gained one is refused before
    anything is built; naming it yourself (here, on the command line) runs it."""
    cfg = compose_config([*TAPE, f"tracking.uri={store}", "trainer.progress=false", "trainer.max_steps=6"])
    train(cfg, output_dir=tmp_path / "run")
    record_path = tmp_path / "run" / "checkpoints" / "run.json"
    record = json.loads(record_path.read_text())
    marker = tmp_path / "marker"
    record["config"]["trainer"]["callbacks"] = [{"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}]
    record_path.write_text(json.dumps(record))

    def resume(*overrides: str) -> float:
        args = [f"resume={tmp_path / 'run'}", "trainer.max_steps=9", *overrides]
        return train(compose_config([f"tracking.uri={store}", "trainer.progress=false", *args]), overrides=args)

    with pytest.raises(TrainerError) as refused:
        resume()
    assert not marker.exists()
    assert str(refused.value) == (
        f"resume: {record_path}: trainer.callbacks.0._target_='pathlib.Path.touch' is not built in and not named "
        "by your own config or command line; if you trust where it comes from, allow it with "
        "trusted_targets=[pathlib.Path.touch]"
    )
    record["config"]["trainer"]["callbacks"] = [{"_target_": "my_callbacks.MeanLoss", "every": None}]
    record_path.write_text(json.dumps(record))
    with pytest.raises(TrainerError, match=r"my_callbacks\.MeanLoss' is not built in"):
        resume()
    resume("trainer.callbacks=[{_target_:my_callbacks.MeanLoss}]")  # the run's own config is used; you name it
    run = only_run(store)
    assert run.info.status == "FINISHED" and list(history(store, run.info.run_id, "custom/mean_loss")) == [9]
