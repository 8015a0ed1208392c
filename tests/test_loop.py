"""The compiled step against analytic gradients, finite differences and hand-computed trajectories."""

from __future__ import annotations

import functools
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import option_kwargs
from trainer import losses
from trainer.data import regression
from trainer.loop import MIN_EPOCH_FOR_CUTS, PER_VARIABLE, StepLoop
from trainer.models import MLP, Linear
from trainer.optim import Adam, Schedule

X, Y = np.array([[2.0]], np.float32), np.array([[3.0]], np.float32)


def tape_loop(lr: float = 0.01, **kwargs) -> StepLoop:
    model = Linear(units=1, w_init=0.5, b_init=1.0)
    return StepLoop(model, losses.squared, keras.optimizers.SGD(lr), X, Y, batch_size=1, **kwargs)


def test_tape_example_gradients_are_exact():
    """TensorFlow's introduction: loss = (3 - (0.5*2 + 1))^2 = 1, dL/dw = -2*1*2 = -4, dL/db = -2."""
    loop = tape_loop()
    grads = {name: g.numpy() for name, g in zip(loop.variable_names, loop.gradients(), strict=True)}
    assert list(grads) == ["w", "b"]
    assert grads["w"].item() == -4.0
    assert grads["b"].item() == -2.0


def test_sgd_steps_follow_the_hand_computed_trajectory():
    """With lr: w += 4*lr*r, b += 2*lr*r, so the residual r = 3 - (2w + b) shrinks by (1 - 10 lr) a step."""
    lr, steps = 0.01, 12
    loop = tape_loop(lr)
    out = {k: v.numpy() for k, v in loop.run(steps).items()}
    r = 1.0
    w, b, expected_loss = 0.5, 1.0, []
    for _ in range(steps):
        expected_loss.append(r * r)
        w, b = w + 4 * lr * r, b + 2 * lr * r
        r = 3.0 - (2 * w + b)
    np.testing.assert_allclose(out["train/loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(out[PER_VARIABLE][:, 0], 4 * np.sqrt(expected_loss), rtol=1e-5)  # |dL/dw| = 4r
    np.testing.assert_allclose(out[PER_VARIABLE][:, 1], 2 * np.sqrt(expected_loss), rtol=1e-5)  # |dL/db| = 2r
    np.testing.assert_allclose(out["train/lr"], lr)
    np.testing.assert_allclose(loop.model.w.numpy().item(), w, rtol=1e-5)
    np.testing.assert_allclose(loop.model.b.numpy().item(), b, rtol=1e-5)
    assert int(loop.step.numpy()) == steps


def test_chunks_of_any_size_give_the_same_run_and_trace_once():
    """k is a tensor: chunks of 5, 5, 3 equal one chunk of 13, and the chunk function is traced once."""
    data = regression(**option_kwargs("data", "regression", n_samples=256, n_features=4, val_fraction=0.0))

    def make() -> StepLoop:
        keras.utils.set_random_seed(1)
        model = MLP(**option_kwargs("model", "mlp", hidden=[8], units=1))
        return StepLoop(model, losses.mse, keras.optimizers.Adam(1e-2), data.x_train, data.y_train, 32, seed=3)

    one, many = make(), make()
    whole = one.run(13)["train/loss"].numpy()
    parts = np.concatenate([many.run(k)["train/loss"].numpy() for k in (5, 5, 3)])
    np.testing.assert_allclose(parts, whole, rtol=1e-6)
    assert many._chunk.experimental_get_tracing_count() == 1
    for a, b in zip(one.model.weights, many.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_chunks_cut_at_epochs_equal_the_per_step_epoch_check_and_trace_once():
    """Epochs of >= MIN_EPOCH_FOR_CUTS batches: the new epoch's order is drawn once per call, before the loop.

    run(100) over 32-batch epochs is four calls (32, 32, 32, 4), one trace, and the same run, loss for
    loss and weight for weight, as a loop that checks for a new epoch in every step; each epoch's order
    is a permutation of the rows, different from the last.
    """
    data = regression(**option_kwargs("data", "regression", n_samples=64, n_features=3, val_fraction=0.0))

    def make(cut: bool) -> StepLoop:
        keras.utils.set_random_seed(2)
        loop = StepLoop(
            MLP(**option_kwargs("model", "mlp", hidden=[8], units=1)),
            losses.mse,
            Adam(learning_rate=1e-2),
            data.x_train,
            data.y_train,
            2,
        )
        loop.cut_at_epochs = cut
        return loop

    cut, per_step = make(True), make(False)
    assert per_step.steps_per_epoch == MIN_EPOCH_FOR_CUTS == 32
    orders = []
    for k in (10, 22, 32):  # ends exactly on epoch boundaries: the next call draws the new order
        cut.run(k)
        orders.append(cut.order.numpy().copy())
    assert cut.call_limit(64) == 32 and cut.call_limit(70) == 26
    assert not np.array_equal(orders[1], orders[2]) and sorted(orders[2]) == list(range(64))
    rest = cut.run(36)  # across a boundary: split into 32 + 4, joined
    assert rest["train/loss"].shape == (36,) and int(rest["steps"]) == 36
    a = per_step.run(100)["train/loss"].numpy()
    assert int(cut.step.numpy()) == int(per_step.step.numpy()) == 100
    np.testing.assert_array_equal(cut.order.numpy(), per_step.order.numpy())
    np.testing.assert_allclose(rest["train/loss"].numpy(), a[64:], rtol=1e-6)
    for w_cut, w_step in zip(cut.model.weights, per_step.model.weights, strict=True):
        np.testing.assert_allclose(w_cut.numpy(), w_step.numpy(), rtol=1e-6)
    assert cut._chunk.experimental_get_tracing_count() == 1


def test_norms_match_global_norm_and_finite_differences_on_the_mlp():
    """Per-variable norms of the tape's gradients equal tf.norm; the global norm equals tf.linalg.global_norm;
    and the gradient itself matches central finite differences of the loss (float64)."""
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
        model = MLP(**option_kwargs("model", "mlp", hidden=[5, 4], units=2, activation="tanh"))
        loop = StepLoop(model, losses.mse, keras.optimizers.SGD(0.0), x, y, batch_size=16)
        grads = loop.gradients()
        out = loop.run(1)
        per_var = out[PER_VARIABLE].numpy()[0]
        np.testing.assert_allclose(per_var, [tf.norm(g).numpy() for g in grads], rtol=1e-6)
        np.testing.assert_allclose(out["train/grad_norm"].numpy()[0], tf.linalg.global_norm(grads).numpy(), rtol=1e-6)

        def loss_at() -> float:
            return float(losses.mse(y, model(x)).numpy())

        eps = 1e-6
        for var, grad in zip(loop.variables, grads, strict=True):
            flat = var.numpy().ravel()
            for i in range(0, flat.size, max(1, flat.size // 5)):  # a few entries of every variable
                bumped = flat.copy()
                bumped[i] += eps
                var.assign(bumped.reshape(var.shape))
                up = loss_at()
                bumped[i] -= 2 * eps
                var.assign(bumped.reshape(var.shape))
                down = loss_at()
                var.assign(flat.reshape(var.shape))
                assert (up - down) / (2 * eps) == pytest.approx(grad.numpy().ravel()[i], rel=1e-5, abs=1e-8)
    finally:
        keras.config.set_dtype_policy("float32")


def test_clip_norm_bounds_the_update_but_logs_the_unclipped_norm():
    loop = tape_loop(lr=0.1, clip_norm=1.0)
    out = loop.run(1)
    assert out["train/grad_norm"].numpy()[0] == pytest.approx(np.sqrt(20.0), rel=1e-6)  # |(-4, -2)|
    scale = 1.0 / np.sqrt(20.0)
    assert loop.model.w.numpy().item() == pytest.approx(0.5 + 0.1 * 4 * scale, rel=1e-6)
    assert loop.model.b.numpy().item() == pytest.approx(1.0 + 0.1 * 2 * scale, rel=1e-6)


def test_each_epoch_sees_every_example_once_in_a_seeded_order():
    loop = StepLoop(
        Linear(**option_kwargs("model", "linear", units=1)),
        losses.mse,
        keras.optimizers.SGD(0.0),
        np.arange(10.0)[:, None],
        np.zeros((10, 1)),
        3,
    )
    assert loop.steps_per_epoch == 3  # the ragged last batch is dropped
    seen = []
    for _ in range(3):
        x, _ = loop.input.batch(loop.step)
        seen.extend(x.numpy().ravel().tolist())
        loop.step.assign_add(1)
    assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    first_epoch = loop.order.numpy().copy()
    loop.input.batch(loop.step)  # step 3 starts epoch 1: a new order
    assert not np.array_equal(first_epoch, loop.order.numpy())
    assert sorted(loop.order.numpy()) == list(range(10))


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("constant", 500, 0.1),
        ("cosine", 0, 0.1),
        ("cosine", 500, 0.05),
        ("cosine", 1000, 0.0),
        ("exponential", 100, 0.1 * 0.5),
        ("warmup_cosine", 0, 0.1 / 100),
        ("warmup_cosine", 49, 0.1 * 50 / 100),
        ("warmup_cosine", 100, 0.1),
        ("warmup_cosine", 1100, 0.0),
    ],
)
def test_schedules_are_the_documented_functions_of_the_step(name, step, expected):
    kwargs = {"decay_steps": 100, "decay_rate": 0.5} if name == "exponential" else {}
    warmup = 100 if name == "warmup_cosine" else 0
    if warmup:
        kwargs["warmup_steps"] = warmup
    schedule = Schedule(0.1, total_steps=1000 + warmup, **option_kwargs("schedule", name, **kwargs))
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-7)


def test_logged_learning_rate_is_the_one_the_step_used():
    lr = Schedule(0.1, total_steps=10, **option_kwargs("schedule", "exponential", decay_steps=1, decay_rate=0.5))
    loop = StepLoop(Linear(1, 0.5, 1.0), losses.squared, keras.optimizers.SGD(lr), X, Y, batch_size=1)
    np.testing.assert_allclose(loop.run(4)["train/lr"].numpy(), [0.1, 0.05, 0.025, 0.0125], rtol=1e-6)


@pytest.mark.parametrize(
    ("fn", "y", "pred", "expected"),
    [
        (losses.squared, [[3.0, 1.0]], [[2.0, 3.0]], 1.0 + 4.0),
        (losses.mse, [[3.0, 1.0]], [[2.0, 3.0]], 2.5),
        (losses.mae, [[3.0, 1.0]], [[2.0, 3.0]], 1.5),
        (functools.partial(losses.huber, delta=1.0), [[0.0, 0.0]], [[0.5, 3.0]], (0.125 + (0.5 + 2.0)) / 2),
        (functools.partial(losses.binary_crossentropy, from_logits=True), [[1.0]], [[0.0]], np.log(2.0)),
        (functools.partial(losses.categorical_crossentropy, from_logits=True), [[0.0, 1.0]], [[0.0, 0.0]], np.log(2.0)),
    ],
)
def test_losses_match_their_formulas(fn, y, pred, expected):
    value = fn(tf.constant(y), tf.constant(pred))
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_jit_compiles_the_gradients_and_follows_the_same_trajectory():
    data = regression(**option_kwargs("data", "regression", n_samples=256, n_features=4, val_fraction=0.0))

    def losses_with(jit: bool) -> np.ndarray:
        keras.utils.set_random_seed(1)
        model = MLP(**option_kwargs("model", "mlp", hidden=[8], units=1))
        loop = StepLoop(model, losses.mse, keras.optimizers.Adam(1e-2), data.x_train, data.y_train, 32, jit=jit)
        values = np.concatenate([loop.run(k)["train/loss"].numpy() for k in (5, 7)])
        assert loop._chunk.experimental_get_tracing_count() == 1
        return values

    np.testing.assert_allclose(losses_with(True), losses_with(False), rtol=1e-4)


def test_a_sweeps_trials_in_one_process_never_warn_of_retracing():
    """Optuna's 5th in-process trial printed TensorFlow's "5 out of the last 5 calls ... triggered tf.function
    retracing": its count was per code object, summed over every trial's new loop. Seven loops, each traced once
    for its chunk and its evaluation, now log no such warning."""
    data = regression(**option_kwargs("data", "regression", n_samples=128, n_features=4, val_fraction=0.25))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    tf.get_logger().addHandler(handler)
    try:
        for trial in range(7):
            keras.utils.set_random_seed(trial)
            model = MLP(**option_kwargs("model", "mlp", hidden=[8], units=1))
            loop = StepLoop(model, losses.mse, keras.optimizers.SGD(1e-2), data.x_train, data.y_train, 16)
            loop.run(3)
            loop.evaluate(tf.constant(data.x_val), tf.constant(data.y_val))
            assert loop._chunk.experimental_get_tracing_count() == 1
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [r for r in records if "retracing" in r], records
