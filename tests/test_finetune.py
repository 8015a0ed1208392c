"""Fine-tuning on scikit-learn's digits as a PNG folder: phase 1 trains a CNN's head with its conv block frozen
(`model.freeze`), phase 2 starts from phase 1's weights (`trainer.init_from`) with everything trainable. Frozen
weights stay bitwise; phase 2 moves them and beats phase 1's accuracy; bad settings are one line."""

from __future__ import annotations

import glob
import itertools
import os
import signal

import mlflow
import numpy as np
import pytest
import tensorflow as tf

from trainer import finetune
from trainer.callbacks import Callback
from trainer.config import TrainerError
from trainer.train import train

STEPS = 300


def _run(tmp_path, compose_cfg, digits, name: str, *extra: str):
    overrides = ["model=cnn", "model.filters=[8]", "loss=sparse_categorical_crossentropy", "data=image_folder",
                 f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale", f"trainer.max_steps={STEPS}",
                 f"tracking.run_name={name}", "tracking.system_metrics=false", *extra]  # fmt: skip
    cfg = compose_cfg(overrides)
    train(cfg, overrides=overrides, output_dir=tmp_path / name)
    client = mlflow.MlflowClient(str(cfg.tracking.uri))
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id],
                               f"attributes.run_name = '{name}'")  # fmt: skip
    return client, run


def _checkpoint(tmp_path, name: str, step: int) -> dict[str, np.ndarray]:
    [index] = glob.glob(str(tmp_path / name / "checkpoints" / f"ckpt-{step}.index"))
    reader = tf.train.load_checkpoint(index.removesuffix(".index"))
    return {
        key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map() if key.startswith(("non_", "opt"))
    }


@pytest.mark.slow  # ~10 s, the fast suite's longest single test
def test_frozen_conv_block_stays_bitwise_then_init_from_unfreezes_and_beats_it(tmp_path, compose_cfg, digits):
    client, phase1 = _run(tmp_path, compose_cfg, digits, "phase1", "model.freeze=[conv_*,bn_*]")
    before, after = _checkpoint(tmp_path, "phase1", 0), _checkpoint(tmp_path, "phase1", STEPS)
    frozen = sorted(k for k in before if k.startswith("non_trainable/"))
    assert len(frozen) == 5  # conv_0's kernel, bn_0's gamma, beta, moving mean and variance
    for key in frozen:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)  # bitwise: not one ulp moved
    norms = {k for k in phase1.data.metrics if k.startswith("train/grad_norm_by_var/")}
    assert norms == {"train/grad_norm_by_var/head/kernel", "train/grad_norm_by_var/head/bias"}  # only the head trains

    _, phase2 = _run(tmp_path, compose_cfg, digits, "phase2", f"trainer.init_from={phase1.info.run_id}")
    assert phase2.data.tags["init_from"].endswith(f"of run {phase1.info.run_id}")
    _, fresh = _run(tmp_path, compose_cfg, digits, "fresh")
    first = {r.info.run_name: client.get_metric_history(r.info.run_id, "train/loss")[0].value
             for r in (phase1, phase2, fresh)}  # fmt: skip
    accuracy = {r.info.run_name: r.data.metrics["val/accuracy"] for r in (phase1, phase2, fresh)}
    print(f"digits CNN, {STEPS} steps each: val accuracy {accuracy}; first-step loss {first}")
    assert first["phase2"] < 0.75 * first["fresh"]  # it starts where phase 1 ended, not from scratch
    assert accuracy["phase2"] > accuracy["phase1"] + 0.05
    one = tf.keras.models.load_model(tmp_path / "phase1" / "model.keras", compile=False)
    two = tf.keras.models.load_model(tmp_path / "phase2" / "model.keras", compile=False)
    conv = [w for w in one.weights if "conv_0" in w.path]
    moved = [w for w in two.weights if "conv_0" in w.path]
    assert conv and not np.array_equal(conv[0].numpy(), moved[0].numpy())  # unfrozen in phase 2: it trained


def test_init_from_a_run_directory_copies_the_weights_exactly(tmp_path, compose_cfg, digits):
    _run(tmp_path, compose_cfg, digits, "source", "trainer.max_steps=20")
    logged = tf.keras.models.load_model(tmp_path / "source" / "model.keras", compile=False)
    assert {type(layer).__module__.split(".")[0] for layer in logged.layers} == {"keras"}  # Keras' own layers only
    from trainer.models import CNN

    model = CNN([8], 3, 2, True, 0.0, [], "relu", 10, None)
    model(np.zeros((1, 8, 8, 1), np.uint8))
    assert finetune.init_from(model, str(tmp_path / "source"), None).endswith("model.keras")
    for ours, theirs in zip(model.weights, logged.weights, strict=True):  # its preprocessing (Rescaling) has none
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.freeze=[conv]"], "model.freeze: 'conv' names no layer of the model; its layers: act_0, bn_0, conv_0"),
        (["model.freeze=[backbone]"], "model.freeze=[backbone] is for model=keras_app; name this model's layers"),
        (["model.freeze=[conv_*,bn_*,head]"], "optimizer 'optimizer' has no trainable variable"),
        (["trainer.init_from=nosuchrun"], "trainer.init_from=nosuchrun: no run 'nosuchrun' in sqlite:"),
        (["trainer.unfreeze.at_step=400"], "trainer.unfreeze.at_step=400 is not before the run's end (step 300)"),
        (["trainer.unfreeze.at_step=10"], "trainer.unfreeze.layers=null unfreezes what model.freeze froze, and it"),
        (
            ["model.freeze=[head]", "trainer.unfreeze.at_step=10", "trainer.unfreeze.layers=[conv]"],
            "trainer.unfreeze.layers: 'conv' names no layer of the model",
        ),
        (["model.filters=[4]", "trainer.init_from=SOURCE"], "trainer.init_from=SOURCE: its weights do not fit"),
    ],
)
def test_bad_fine_tuning_settings_are_one_line(tmp_path, compose_cfg, digits, extra, message):
    if any("SOURCE" in e for e in extra):
        _run(tmp_path, compose_cfg, digits, "source", "trainer.max_steps=5")
        extra = [e.replace("SOURCE", str(tmp_path / "source")) for e in extra]
        message = message.replace("SOURCE", str(tmp_path / "source"))
    with pytest.raises(TrainerError) as error:
        _run(tmp_path, compose_cfg, digits, "bad", *extra)
    assert str(error.value).startswith(message) or message in str(error.value), str(error.value)


def test_freeze_backbone_leaves_a_keras_app_its_head_only():
    from trainer.models import KerasApp

    model = KerasApp("MobileNetV3Small", None, "avg", 10, [32, 32, 3], ["backbone"])
    model(np.zeros((1, 32, 32, 3), np.uint8))
    assert [v.path for v in model.trainable_variables] == ["keras_app/head/kernel", "keras_app/head/bias"]
    assert len(model.non_trainable_variables) > 100  # the whole application, its BatchNorm statistics too
    assert model.get_config()["freeze"] == ["backbone"]  # saved with the model, so a loaded one is frozen alike


class _Unfreeze(Callback):
    """A callback unfreezing the conv block mid-run: before, its weights silently never moved."""

    def on_chunk_end(self, ctx, step, arrays) -> bool:
        if step >= 40:
            for layer in ctx.model.stack[:2]:
                layer.trainable = True
        return False


def test_a_callback_that_changes_what_trains_mid_run_is_one_line(tmp_path, compose_cfg, digits):
    overrides = ["model=cnn", "model.filters=[8]", "loss=sparse_categorical_crossentropy", "data=image_folder",
                 f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale", "trainer.max_steps=100",
                 "trainer.steps_per_loop=20", "model.freeze=[conv_*,bn_*]"]  # fmt: skip
    with pytest.raises(TrainerError, match=r"^at step 40 the trainable variables of optimizer 'optimizer' changed "
                                           r"\(conv_0/kernel, 3 in all\): the compiled step trains"):  # fmt: skip
        train(compose_cfg(overrides), overrides=overrides, output_dir=tmp_path / "out", callbacks=[_Unfreeze()])


class _Snapshots(Callback):
    """The conv block's kernel after every chunk, by step."""

    def __init__(self) -> None:
        self.kernels: dict[int, np.ndarray] = {}

    def on_chunk_end(self, ctx, step, arrays) -> bool:
        self.kernels[step] = ctx.model.stack[0].kernel.numpy().copy()
        return False


PHASES = ["model.freeze=[conv_*,bn_*]", "trainer.unfreeze.at_step=150", "trainer.unfreeze.lr_multiplier=0.3"]


def test_unfreeze_at_a_step_trains_the_frozen_block_from_there_with_a_new_optimizer(tmp_path, compose_cfg, digits):
    """One run, two phases: the conv block bitwise still up to step 150, moving after; its gradient norms logged
    at exactly steps 150..299; the lr 1e-3 then 3e-4; one retrace."""
    snapshots = _Snapshots()
    overrides = ["model=cnn", "model.filters=[8]", "loss=sparse_categorical_crossentropy", "data=image_folder",
                 f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale", "trainer.max_steps=300",
                 "trainer.steps_per_loop=50", "tracking.system_metrics=false", *PHASES]  # fmt: skip
    cfg = compose_cfg(overrides)
    train(cfg, overrides=overrides, output_dir=tmp_path / "two", callbacks=[snapshots])
    steps = sorted(snapshots.kernels)
    assert steps == [44, 88, 132, 150, 176, 220, 264, 300]  # epochs of 44 steps, and a chunk ends at 150
    first = snapshots.kernels[44]
    for step in (88, 132, 150):
        np.testing.assert_array_equal(snapshots.kernels[step], first)  # frozen through the first phase
    for before, after in itertools.pairwise(steps[3:]):  # and moving in every chunk of the second
        assert not np.array_equal(snapshots.kernels[before], snapshots.kernels[after]), after
    client = mlflow.MlflowClient(str(cfg.tracking.uri))
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    conv = client.get_metric_history(run.info.run_id, "train/grad_norm_by_var/conv_0/kernel")
    assert sorted(m.step for m in conv) == list(range(150, 300))
    head = client.get_metric_history(run.info.run_id, "train/grad_norm_by_var/head/kernel")
    assert sorted(m.step for m in head) == list(range(300))
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert all(lr[s] == pytest.approx(1e-3) for s in range(150))
    assert all(lr[s] == pytest.approx(3e-4) for s in range(150, 300))
    assert run.data.tags["unfrozen_at_step"] == "150"


class _InterruptAt(Callback):
    """Ctrl-C from the first chunk end at or past `at`: the run stops after its round, checkpointed."""

    def __init__(self, at: int) -> None:
        self.at, self.sent = at, False

    def on_chunk_end(self, ctx, step, arrays) -> bool:
        if step >= self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return False


@pytest.mark.slow  # 2 x 15 s: the fast suite's time (the slow suite runs them)
@pytest.mark.parametrize("stop", [100, 200])  # interrupted before the second phase, and inside it
def test_a_run_resumed_across_the_unfreeze_ends_bitwise_equal(tmp_path, compose_cfg, digits, stop):
    common = ["model=cnn", "model.filters=[8]", "loss=sparse_categorical_crossentropy", "data=image_folder",
              f"data.path={digits['root'] / 'png'}", "data.color_mode=grayscale", "trainer.steps_per_loop=25",
              "trainer.deterministic=true", "tracking.system_metrics=false", "trainer.max_steps=300",
              *PHASES]  # fmt: skip
    train(compose_cfg(common), overrides=common, output_dir=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(compose_cfg(common), overrides=common, output_dir=tmp_path / "b", callbacks=[_InterruptAt(stop)])
    stopped = max(int(p.stem.removeprefix("ckpt-")) for p in (tmp_path / "b" / "checkpoints").glob("ckpt-*.index"))
    assert (stopped < 150) == (stop < 150)  # resumed before the unfreeze, or after it
    train(compose_cfg([*common, f"resume={tmp_path / 'b'}"]), output_dir=tmp_path / "b")
    a = tf.keras.models.load_model(tmp_path / "a" / "model.keras", compile=False).weights
    b = tf.keras.models.load_model(tmp_path / "b" / "model.keras", compile=False).weights
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)  # bitwise


def test_a_run_logged_before_model_freeze_existed_resumes(tmp_path, compose_cfg):
    """Its run.json has no model.freeze: the option's default (null) fills it, as for other keys added since."""
    import json

    overrides = ["model=mlp", "data.n_samples=256", "trainer.max_steps=20", "tracking.log_model=false"]
    train(compose_cfg(overrides), overrides=overrides, output_dir=tmp_path / "old")
    run_file = tmp_path / "old" / "checkpoints" / "run.json"
    record = json.loads(run_file.read_text())
    del record["config"]["model"]["freeze"]
    run_file.write_text(json.dumps(record))
    train(compose_cfg([f"resume={tmp_path / 'old'}"]), overrides=["trainer.max_steps=30"], output_dir=tmp_path / "old")
    steps = int(
        tf.train.load_checkpoint(str(tmp_path / "old" / "checkpoints")).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
    )
    assert steps == 30
