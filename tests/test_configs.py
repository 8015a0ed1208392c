"""Every config option composes, checks and builds (lightning-hydra-template style), in-process.

Options are discovered by globbing conf/<group>/*.yaml, so a new YAML file is tested without editing
this module. Composition is real Hydra (schemas registered, version_base 1.3); building is real
`hydra.utils.instantiate` through `trainer.config.build`, with real Keras/TensorFlow objects.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from trainer import config as tconfig
from trainer.config import SCHEMAS, TrainerError, build, check
from trainer.data import Dataset
from trainer.data.prepare import load as load_data
from trainer.optim import build_optimizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "loss", "data", "optimizer", "schedule", "trainer", "tracking", "experiment")
TYPED_GROUPS = ("model", "loss", "data", "optimizer", "schedule", "trainer", "tracking")
# Options that only compose into a checkable config together with another choice.
SET_BY_FIXTURE = {"tracking.uri", "trainer.progress"}  # compose_cfg points these at tmp_path / off
EXTRA_OVERRIDES = {("model", "classifier"): ["data=classification"]}  # units: ${data.n_classes}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _params(*groups: str) -> list:
    return [pytest.param(g, name, id=f"{g}={name}") for g in groups for name in _options(g)]


def _yaml(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}


def _schema_of(group: str, name: str) -> type | None:
    """The dataclass a YAML option starts from: its defaults list names `/schema/<group>/<schema>@_here_`."""
    for entry in _yaml(group, name).get("defaults", []):
        m = re.fullmatch(rf"/schema/{group}/(\w+)@_here_", str(entry))
        if m:
            return SCHEMAS[group][m.group(1)]
    return None


def _write_csv(path: Path) -> np.ndarray:
    """A 10-row CSV with columns a, b, y; returns its numbers as a [10, 3] array."""
    rows = np.array([[i, 0.5 * i - 1.0, 2.0 * i + 0.25] for i in range(10)], dtype=np.float64)
    lines = ["a,b,y", *(",".join(f"{v:g}" for v in r) for r in rows)]
    path.write_text("\n".join(lines) + "\n")
    return rows


def _overrides(group: str, name: str, tmp_path: Path) -> list[str]:
    ov = [f"{group}={name}", *EXTRA_OVERRIDES.get((group, name), [])]
    if (group, name) == ("data", "csv"):
        _write_csv(tmp_path / "table.csv")
        ov += [f"data.path={tmp_path / 'table.csv'}", "data.target=[y]"]
    if group == "data" and name in FILE_SOURCES:
        ov += FILE_SOURCES[name](tmp_path, _write_csv(tmp_path / "table.csv"))
    return ov


def _parquet(tmp_path: Path, rows: np.ndarray) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": rows[:, 0], "b": rows[:, 1], "y": rows[:, 2]}), tmp_path / "t.parquet")
    return [f"data.path={tmp_path / 't.parquet'}", "data.target=y"]


def _tfrecord(tmp_path: Path, rows: np.ndarray) -> list[str]:
    with tf.io.TFRecordWriter(str(tmp_path / "t.tfrecord")) as w:
        for r in rows:
            f = {k: tf.train.Feature(float_list=tf.train.FloatList(value=v)) for k, v in (("x", r[:2]), ("y", r[2:]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    spec = "{x: {shape: [2], dtype: float32}, y: {shape: [], dtype: float32}}"
    return [f"data.path={tmp_path / 't.tfrecord'}", f"data.features={spec}", "data.inputs=x", "data.target=y"]


def _image_folder(tmp_path: Path, rows: np.ndarray) -> list[str]:
    for i in range(len(rows)):
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        png = tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(i, tf.uint8)))
        tf.io.write_file(str(tmp_path / "images" / f"c{i % 2}" / f"{i}.png"), png)
    return [f"data.path={tmp_path / 'images'}"]


def _numpy(tmp_path: Path, rows: np.ndarray) -> list[str]:
    np.savez(tmp_path / "t.npz", x=rows[:, :2], y=rows[:, 2])
    return [f"data.path={tmp_path / 't.npz'}"]


FILE_SOURCES = {"parquet": _parquet, "tfrecord": _tfrecord, "image_folder": _image_folder, "numpy": _numpy}


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no YAML options"
    assert "tape_example" in _options("experiment")


# --- every option: compose, typed, same values as its file, range checks pass -------------------
@pytest.mark.parametrize(("group", "name"), _params(*GROUPS))
def test_option_composes_and_checks(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    check(cfg)  # raises TrainerError on any out-of-range value

    raw = OmegaConf.to_container(cfg, resolve=False)
    file_values = {k: v for k, v in _yaml(group, name).items() if k != "defaults"}
    if group != "experiment":  # `# @package _global_` files set keys at the top level
        file_values = {group: file_values}
    for key, expected in _leaves(file_values):
        if expected == "???" or key in SET_BY_FIXTURE:
            continue  # mandatory ones are set by _overrides (csv path/target)
        node = raw
        for part in key.split("."):
            node = node[part]
        assert node == expected, f"{key}: composed {node!r}, {group}/{name}.yaml says {expected!r}"

    if group != "experiment":
        schema = _schema_of(group, name)
        assert schema is not None, f"conf/{group}/{name}.yaml does not start from a /schema/{group}/ node"
        assert OmegaConf.get_type(cfg[group]) is schema


def test_default_config_groups_are_typed(compose_cfg):
    cfg = compose_cfg([])
    assert OmegaConf.get_type(cfg.model) is SCHEMAS["model"]["linear"]
    assert OmegaConf.get_type(cfg.data) is SCHEMAS["data"]["regression"]
    assert OmegaConf.get_type(cfg.optimizer) is SCHEMAS["optimizer"]["adam"]
    assert OmegaConf.get_type(cfg.schedule) is tconfig.Schedule
    assert OmegaConf.get_type(cfg.trainer) is tconfig.TrainerSettings
    assert OmegaConf.get_type(cfg.tracking) is tconfig.Tracking
    assert OmegaConf.get_type(compose_cfg(["optimizer=sgd"]).optimizer) is tconfig.SGDOptimizer
    # typed nodes keep rejecting bad values after composition, too
    with pytest.raises(ValidationError):
        cfg.optimizer.epsilon = "abc"  # (optimizer.lr takes a str too: auto, checked by config.check)
    with pytest.raises(ConfigAttributeError):
        cfg.trainer.batch_sise = 8


def test_composed_overrides_and_test_defaults(compose_cfg, tracking_uri):
    cfg = compose_cfg(["optimizer=sgd", "optimizer.lr=0.05", "trainer.max_steps=7", "model=mlp", "model.hidden=[3,5]"])
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer._target_ == "keras.optimizers.SGD"
    assert cfg.trainer.max_steps == 7
    assert list(cfg.model.hidden) == [3, 5]
    assert cfg.tracking.uri == tracking_uri and tracking_uri.startswith("sqlite:///")
    assert cfg.trainer.progress is False


# --- build each group ---------------------------------------------------------------------------
IMAGE_MODELS = {"cnn", "sequential", "keras_app"}  # tests/test_models.py builds them on images and sequences


@pytest.mark.parametrize(("group", "name"), [p for p in _params("model") if p.values[1] not in IMAGE_MODELS])
def test_model_builds_and_runs(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    known = cfg.data.n_classes if "n_classes" in cfg.data else cfg.data.n_targets  # what the trainer fills in
    units_from_data = {"units": known} if cfg.model.get("units", 0) is None else {}
    model = build(cfg.model, **units_from_data)
    assert isinstance(model, keras.Model)
    n_features, units = cfg.data.n_features, cfg.model.units or units_from_data["units"]
    x = np.random.default_rng(0).standard_normal((5, n_features)).astype(np.float32)
    out = model(x)
    assert tuple(out.shape) == (5, units)
    assert np.all(np.isfinite(np.asarray(out)))

    shapes = [tuple(v.shape) for v in model.trainable_variables]
    if "hidden" in cfg.model:  # dense stack + head: kernel and bias per layer, widths chained
        widths = [n_features, *cfg.model.hidden, units]
        expected = [s for a, b in itertools.pairwise(widths) for s in ((a, b), (b,))]
        assert shapes == expected
    else:
        assert shapes == [(n_features, units), (units,)]
    if name == "classifier":
        assert units == cfg.data.n_classes == 3


def test_linear_model_constant_init(compose_cfg):
    cfg = compose_cfg(["model=linear", "model.units=2", "model.w_init=0.5", "model.b_init=-1.0"])
    model = build(cfg.model)
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), [[0.5 * 6 - 1.0, 0.5 * 6 - 1.0]], rtol=1e-6)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


REFERENCE_LOSSES = {  # numpy, float64, independent of the TF code
    "mse": lambda t, p, c: np.mean((t - p) ** 2),
    "mae": lambda t, p, c: np.mean(np.abs(t - p)),
    "squared": lambda t, p, c: np.mean(np.sum((t - p) ** 2, axis=-1)),
    "huber": lambda t, p, c: np.mean(
        np.where(np.abs(t - p) <= c.delta, 0.5 * (t - p) ** 2, c.delta * (np.abs(t - p) - 0.5 * c.delta))
    ),
    "binary_crossentropy": lambda t, z, c: np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))),
    "categorical_crossentropy": lambda t, z, c: np.mean(-np.sum(t * _log_softmax(z), axis=-1)),
    "sparse_categorical_crossentropy": lambda t, z, c: np.mean(-_log_softmax(z)[np.arange(len(t)), t.astype(int)]),
}


@pytest.mark.parametrize(("group", "name"), _params("loss"))
def test_loss_builds_and_gives_finite_scalar(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    loss_fn = build(cfg.loss)
    assert callable(loss_fn)
    if "from_logits" in cfg.loss:  # classification: one-hot targets and logits
        y_true = np.array([[1, 0, 0], [0, 0, 1]], np.float64)
        y_pred = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3]], np.float64)
        if name.startswith("sparse_"):  # integer class ids: the one-hot rows' argmax
            y_true = y_true.argmax(axis=-1).astype(np.float64)
    else:  # errors 1, 1, 2, 0.5: both branches of huber
        y_true = np.array([[1.0, -2.0], [0.5, 3.0]], np.float64)
        y_pred = np.array([[0.0, -1.0], [2.5, 3.5]], np.float64)
    value = np.asarray(loss_fn(tf.constant(y_true, tf.float32), tf.constant(y_pred, tf.float32)))
    assert value.shape == ()
    assert np.isfinite(value) and value > 0
    fn_name = cfg.loss._target_.rsplit(".", 1)[-1]
    if fn_name in REFERENCE_LOSSES:
        expected = REFERENCE_LOSSES[fn_name](y_true, y_pred, cfg.loss)
        assert float(value) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("group", "name"), _params("data"))
def test_data_builds_arrays_of_the_right_shape(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    data = load_data(cfg.data)
    assert isinstance(data, Dataset) and not data.streamed
    arrays = [a for a in (data.x_train, data.x_val) if a is not None]
    assert all(a.dtype == (np.uint8 if name == "image_folder" else np.float32) for a in arrays)

    d = cfg.data
    if name == "tape_example":
        np.testing.assert_array_equal(data.x_train, [[d.x]])
        np.testing.assert_array_equal(data.y_train, [[d.y]])
        assert data.x_val is None and data.y_val is None
        return
    if name in ("csv", *FILE_SOURCES):  # the 10-row table written by _write_csv, in each format
        n = 10
        assert data.n_train + len(data.x_val) == n
        return
    n_val = round(d.n_samples * d.val_fraction)
    if name in ("ring", "oscillator"):  # a GAN's 2-D points (y: the mode id); times t and sin t
        assert data.x_train.shape == (d.n_samples - n_val, 2 if name == "ring" else 1)
        assert len(data.y_train) == d.n_samples - n_val and len(data.x_val) == n_val
        if name == "ring":
            np.testing.assert_allclose(np.linalg.norm(data.x_train, axis=1), d.radius, atol=8 * d.std)
            assert set(np.unique(data.y_train)) == set(range(d.modes))
        else:
            np.testing.assert_allclose(data.y_train, np.sin(data.x_train), atol=1e-6)
        return
    n, n_features = d.n_samples, d.n_features
    n_targets = d.n_classes if "n_classes" in d else d.n_targets  # 4096 * 0.2 = 819.2 -> 819 held out
    assert data.x_train.shape == (n - n_val, n_features)
    assert data.y_train.shape == (n - n_val, n_targets)
    assert data.x_val.shape == (n_val, n_features)
    assert data.y_val.shape == (n_val, n_targets)
    assert all(a.dtype == np.float32 and a.ndim == 2 for a in (data.y_train, data.y_val))


def test_data_split_is_seeded(compose_cfg):
    a = load_data(compose_cfg(["data.n_samples=64"]).data)
    b = load_data(compose_cfg(["data.n_samples=64"]).data)
    c = load_data(compose_cfg(["data.n_samples=64", "data.seed=1"]).data)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def _lr_at(optimizer: keras.Optimizer, step: int) -> float:
    """The learning rate the optimizer uses at `step` (its schedule evaluated on `iterations`)."""
    optimizer.iterations.assign(step)
    return float(optimizer.learning_rate)


@pytest.mark.parametrize(("group", "name"), _params("optimizer"))
def test_optimizer_builds_with_schedule(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule, total_steps=100)
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    assert type(optimizer).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
    assert _lr_at(optimizer, 0) == pytest.approx(cfg.optimizer.lr, rel=1e-6)
    assert _lr_at(optimizer, 99) == pytest.approx(cfg.optimizer.lr, rel=1e-6)  # schedule=constant
    # every other key of the group reaches the Keras optimizer
    keras_cfg = optimizer.get_config()
    for key, value in cfg.optimizer.items():
        if key in ("_target_", "_partial_", "lr"):
            continue
        assert keras_cfg[key] == pytest.approx(value) if isinstance(value, float) else keras_cfg[key] == value


@pytest.mark.parametrize(("group", "name"), _params("schedule"))
def test_schedule_values(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    s, lr = cfg.schedule, cfg.optimizer.lr
    total = 100 + (s.warmup_steps or 0)  # null: a schedule without a warm-up
    opt = build_optimizer(cfg.optimizer, s, total_steps=total)
    approx = lambda v: pytest.approx(v, rel=1e-5, abs=1e-12)  # noqa: E731

    if s.name != "warmup_cosine":
        assert _lr_at(opt, 0) == approx(lr)
    if s.name == "constant":
        assert [_lr_at(opt, k) for k in (1, 50, total, 10 * total)] == [approx(lr)] * 4
    elif s.name == "exponential":
        d = s.decay_steps or total
        assert _lr_at(opt, d) == approx(lr * s.decay_rate)
        assert _lr_at(opt, 2 * d) == approx(lr * s.decay_rate**2)
        assert _lr_at(opt, d // 2) == approx(lr * s.decay_rate ** ((d // 2) / d))
    elif s.name in ("cosine", "warmup_cosine"):
        warmup = s.warmup_steps if s.name == "warmup_cosine" else 0
        decay = s.decay_steps or total - warmup
        for floor in (s.final_lr_fraction, 0.25):
            c = compose_cfg([*_overrides(group, name, tmp_path), f"schedule.final_lr_fraction={floor}"])
            opt = build_optimizer(c.optimizer, c.schedule, total_steps=total)
            # eager reads cost ~10 ms each: sample the run instead of reading every step
            steps = sorted({*range(0, total + 1, max(1, total // 20)), warmup, warmup + decay // 2, total})
            lrs = {k: _lr_at(opt, k) for k in steps}
            mid = warmup + decay // 2
            expected_mid = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (decay // 2) / decay)))
            assert lrs[warmup] == approx(lr)  # the peak, once warm-up is over
            assert lrs[mid] == approx(expected_mid)
            assert lrs[total] == approx(floor * lr)  # ends at final_lr_fraction * lr
            assert _lr_at(opt, 3 * total) == approx(floor * lr)  # and stays there
            after = np.array([v for k, v in lrs.items() if k >= warmup])
            assert np.all(np.diff(after) <= 1e-12)  # non-increasing after warm-up
            if warmup:  # linear rise to lr at the last warm-up step
                rise = [k for k in steps if k < warmup] + [warmup - 1]
                np.testing.assert_allclose(
                    [_lr_at(opt, k) for k in rise], lr * (np.array(rise) + 1) / warmup, rtol=1e-5
                )
    else:
        pytest.fail(f"no expectations for schedule.name={s.name!r}")


@pytest.mark.parametrize(("group", "name"), _params("trainer", "tracking"))
def test_settings_groups_build_their_dataclass(group, name, compose_cfg, tmp_path):
    cfg = compose_cfg(_overrides(group, name, tmp_path))
    obj = OmegaConf.to_object(cfg[group])  # runs __post_init__ range checks
    assert type(obj) is SCHEMAS[group][group]
    values = dataclasses.asdict(obj)  # nested settings dataclasses become dicts, as in the YAML
    for key, value in _yaml(group, name).items():
        if key != "defaults" and f"{group}.{key}" not in SET_BY_FIXTURE:
            assert values[key] == value, key


def test_default_trainer_and_tracking_values(compose_cfg):
    cfg = compose_cfg([])
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.epochs) == (1000, 32, None)
    assert cfg.tracking.experiment == "tape-trainer"
    assert (cfg.tracking.log_every, cfg.tracking.log_grad_norms) == (1, "per_variable")


# --- the GradientTape introduction, from config alone ------------------------------------------
def test_experiment_tape_example(compose_cfg):
    cfg = compose_cfg(["experiment=tape_example"])
    check(cfg)
    assert cfg.model._target_ == "trainer.models.Linear"
    assert (cfg.model.w_init, cfg.model.b_init, cfg.model.units) == (0.5, 1.0, 1)
    assert cfg.loss._target_ == "trainer.losses.squared"
    assert cfg.optimizer._target_ == "keras.optimizers.SGD" and cfg.optimizer.lr == 0.01
    assert OmegaConf.get_type(cfg.optimizer) is tconfig.SGDOptimizer
    assert cfg.data._target_ == "trainer.data.tape_example"
    assert (cfg.data.x, cfg.data.y, cfg.data.val_fraction) == (2.0, 3.0, 0.0)
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.print_gradients) == (10, 1, True)
    assert cfg.schedule.name == "constant"

    data, model, loss_fn = load_data(cfg.data), build(cfg.model), build(cfg.loss)
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    with tf.GradientTape() as tape:
        y_pred = model(x)
        loss = loss_fn(y, y_pred)
    assert float(y_pred[0, 0]) == 2.0  # w * x + b = 0.5 * 2 + 1
    assert float(loss) == 1.0  # (3 - 2)^2
    variables = model.trainable_variables
    names = [v.path.split("/")[-1] for v in variables]
    grads = dict(zip(names, tape.gradient(loss, variables), strict=True))
    assert float(grads["w"][0, 0]) == -4.0
    assert float(grads["b"][0]) == -2.0


# --- bad inputs: rejected at compose time -------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "cause", "words"),
    [
        ("optimizer.beta_1=abc", ValidationError, ["optimizer.beta_1", "abc"]),
        ("trainer.max_steps=ten", ValidationError, ["trainer.max_steps", "ten"]),
        ("trainer.cluster_timeout=soon", ValidationError, ["trainer.cluster_timeout", "soon"]),
        ("trainer.slurm_port=auto", ValidationError, ["trainer.slurm_port", "auto"]),
        ("tracking.log_model=maybe", ValidationError, ["tracking.log_model", "maybe"]),
        ("trainer.batch_sise=8", ConfigAttributeError, ["batch_sise"]),
        ("optimizer.betta_1=0.5", ConfigAttributeError, ["betta_1"]),
    ],
)
def test_bad_type_or_key_rejected_at_compose(override, cause, words, compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    assert isinstance(info.value.__cause__, cause)
    message = f"{info.value}\n{info.value.__cause__}"
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.class_weight={no: 1, yes: 3}", "trainer.class_weight is no setting of trainer (did you mean "
         "data.class_weight?); remove it"),
        ("+tracking.wandb=true", "tracking.wandb is no setting of tracking (one of experiment, "),
        ("+optimizer.use_emma=true", "optimizer.use_emma is no setting of optimizer (did you mean use_ema?)"),
        ("+model.trainable=false", "model.trainable is no setting of model ("),
        ("+trainer.early_stopping.patiense=3", "trainer.early_stopping.patiense is no setting of "
         "trainer.early_stopping (did you mean patience?); remove it"),
        ("+data.agument={flip: horizontal}", "data.agument is no setting of data ("),
        ("+verbos=true", "verbos is no setting (did you mean verbose?); remove it"),
    ],
)  # fmt: skip
def test_a_key_added_with_plus_that_nothing_reads_is_one_line(override, message, compose_cfg):
    """Before: each was accepted, logged as a param and read by nothing (the runs bitwise the same as without)."""
    cfg = compose_cfg([override])  # Hydra's `+` adds any key, to any node
    with pytest.raises(TrainerError) as info:
        check(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    check(compose_cfg([]))  # every key of the defaults is known


def test_unknown_option_rejected_at_compose(compose_cfg):
    with pytest.raises(MissingConfigException) as info:
        compose_cfg(["model=transformr"])
    message = str(info.value)
    assert "model/transformr" in message
    for option in _options("model"):  # the message lists what exists
        assert option in message


# --- bad values: rejected by check() with a one-line TrainerError naming the key -----------------
@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["trainer.max_steps=-1"], "trainer.max_steps", "-1"),
        (["optimizer.lr=-0.1"], "optimizer.lr", "-0.1"),
        (["trainer.batch_size=0"], "trainer.batch_size", "0"),
        (["data.val_fraction=1.5"], "data.val_fraction", "1.5"),
        (["tracking.log_grad_norms=some"], "tracking.log_grad_norms", "some"),
        (["schedule=cosine", "schedule.final_lr_fraction=2"], "schedule.final_lr_fraction", "2"),
        (["optimizer=sgd", "optimizer.momentum=1.0"], "optimizer.momentum", "1.0"),
        (["model=mlp", "model.hidden=[8,0]"], "model.hidden", "0"),
        (["tracking.log_every=0"], "tracking.log_every", "0"),
        (["trainer.device=tpu"], "trainer.device", "tpu"),
        (["trainer.intra_op_threads=0"], "trainer.intra_op_threads", "0"),
        (["trainer.cluster_timeout=0"], "trainer.cluster_timeout", "0"),
        (["trainer.strategy=multi_worker", "trainer.slurm_port=70000"], "trainer.slurm_port", "70000"),
        (["trainer.slurm_port=23456"], "trainer.slurm_port", "null unless trainer.strategy=multi_worker"),
        (["data=csv"], "data.path", "must be set"),
    ],
)
def test_range_errors_name_the_key(overrides, key, value, compose_cfg):
    cfg = compose_cfg(overrides)  # composes: the types are right
    with pytest.raises(TrainerError) as info:
        check(cfg)
    message = str(info.value)
    assert message.startswith(key)
    assert value in message
    assert "\n" not in message


def test_classifier_takes_its_units_from_the_data(compose_cfg):
    """model=classifier states `units: null`: the trainer fills in the data's outputs (a class count, 1 for a
    binary or single-target table) instead of failing on `${data.n_classes}` with data that has none."""
    from trainer.train import _from_data

    cfg = compose_cfg(["model=classifier"])
    check(cfg)
    assert cfg.model.units is None
    assert _from_data(cfg.model, load_data(cfg.data)) == {"units": 1}
    classes = compose_cfg(["model=classifier", "data=classification", "data.n_classes=5"])
    assert _from_data(classes.model, load_data(classes.data)) == {"units": 5}


def test_a_key_a_targets_signature_does_not_take_is_one_line_naming_what_it_takes():
    """Your own `_target_`s: the signature says what a node may hold (before: Hydra's wrapped TypeError)."""
    node = OmegaConf.create({"model": {"_target_": "fractions.Fraction", "numerator": 3, "denom": 4}}).model
    with pytest.raises(TrainerError) as info:
        build(node)
    assert str(info.value) == (
        "model.denom is no parameter of fractions.Fraction (it takes numerator, denominator, _normalize); remove it"
    )
    assert build(OmegaConf.create({"_target_": "fractions.Fraction", "numerator": 3, "denominator": 4})) == 0.75
