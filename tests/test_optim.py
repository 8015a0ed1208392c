"""trainer.optim's fused Adam/AdamW against Keras' own: the same numbers, bitwise, and its fallbacks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import option_kwargs
from trainer.models import MLP
from trainer.optim import FLAT_MAX_SIZE, Adam, AdamW, Schedule

STEPS = 30


def trained(
    optimizer: keras.Optimizer,
    extra_variable: bool = False,
    steps: int = STEPS,
    hidden: tuple = (16, 8),
    activation: str = "relu",
) -> tuple[list[np.ndarray], keras.Optimizer]:
    """`steps` compiled updates of an MLP on fixed data; its weights afterwards. `hidden=(200, 100)` gives it
    a 20,000-parameter kernel, past FLAT_MAX_SIZE: TensorFlow's Adam kernel updates that one."""
    keras.utils.set_random_seed(1)
    model = MLP(**option_kwargs("model", "mlp", hidden=list(hidden), units=1, activation=activation))
    x, y = tf.random.stateless_normal([64, 5], seed=[1, 2]), tf.random.stateless_normal([64, 1], seed=[3, 4])
    model(x)
    variables = list(model.trainable_variables)
    if extra_variable:  # a variable the loss never touches: it gets no gradient
        variables.append(keras.Variable(np.ones((3, 2), np.float32), name="unused"))

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    for _ in range(steps):
        step()
    return [v.numpy() for v in variables], optimizer


def cosine() -> Schedule:
    return Schedule(1e-2, total_steps=STEPS, **option_kwargs("schedule", "cosine"))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: Adam(cosine()), lambda: keras.optimizers.Adam(cosine())),
        (lambda: Adam(cosine(), beta_1=0.8, epsilon=1e-4), lambda: keras.optimizers.Adam(cosine(), 0.8, epsilon=1e-4)),
        (lambda: AdamW(cosine(), weight_decay=0.05), lambda: keras.optimizers.AdamW(cosine(), weight_decay=0.05)),
    ],
)
def test_fused_update_is_bitwise_keras(ours, theirs):
    fused, optimizer = trained(ours())
    stock, _ = trained(theirs())
    assert optimizer._fused.flat and not optimizer._fused.kernel
    names = [v.path.rsplit("/", 1)[-1] for v in optimizer.variables]
    assert names == ["iteration", "flat_momentum", "flat_velocity"]  # a schedule: no learning_rate variable
    assert optimizer.variables[1].shape == (sum(w.size for w in fused),)  # one slot for all parameters
    assert int(optimizer.iterations) == STEPS
    for a, b in zip(fused, stock, strict=True):
        assert np.array_equal(a, b)
    initial, _ = trained(theirs(), steps=0)
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(fused, initial, strict=True))  # every variable moved


def test_a_variable_without_gradient_stays_put():
    fused, _ = trained(Adam(1e-2), extra_variable=True)
    stock, _ = trained(keras.optimizers.Adam(1e-2), extra_variable=True)
    np.testing.assert_array_equal(fused[-1], np.ones((3, 2), np.float32))
    for a, b in zip(fused, stock, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("optimizer", [lambda: Adam(1e-2, amsgrad=True), lambda: Adam(1e-2, fused=False)])
def test_amsgrad_and_fused_false_use_keras_own_update(optimizer):
    ours, built = trained(optimizer())
    keras_kwargs = {"amsgrad": built.amsgrad}
    stock, _ = trained(keras.optimizers.Adam(1e-2, **keras_kwargs))
    assert built._fused is None
    assert "flat_momentum" not in [v.path.rsplit("/", 1)[-1] for v in built.variables]
    for a, b in zip(ours, stock, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", [Adam, AdamW])
def test_large_variables_get_tensorflows_adam_kernel_with_keras_numbers(kind):
    """A 20,000-parameter kernel (5-200-100-1) goes to ResourceApplyAdam, the rest to the flat vector. The kernel
    rounds differently from Keras' 13 ops (vectorized), by an ulp at the first step (7e-8 measured on weights
    below 1). Training amplifies that as any reordering of float32 sums would: with ReLU, a unit at its kink
    gets a zero gradient in one run and not the other, which Adam's normalization turns into a full step
    (AdamW: 5e-4 at step 5, measured); with tanh, ~1e-5 after 30 steps."""
    keras_kind = getattr(keras.optimizers, kind.__name__)
    one, built = trained(kind(cosine()), steps=1, hidden=(200, 100))
    stock_one, _ = trained(keras_kind(cosine()), steps=1, hidden=(200, 100))
    assert len(built._fused.kernel) == 2  # one large variable, under both of its ids
    assert all(np.prod(v.shape) <= FLAT_MAX_SIZE for v in built._fused.flat) and len(built._fused.flat) == 5
    names = [v.path.rsplit("/", 1)[-1] for v in built.variables]  # Keras prefixes slots with the model's name
    assert names[0] == "iteration" and names[3:] == ["flat_momentum", "flat_velocity"]
    assert names[1].endswith("dense_1_kernel_momentum") and names[2].endswith("dense_1_kernel_velocity")
    for a, b in zip(one, stock_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1.5e-7)
    ours, _ = trained(kind(cosine()), hidden=(200, 100), activation="tanh")
    stock, _ = trained(keras_kind(cosine()), hidden=(200, 100), activation="tanh")
    initial, _ = trained(kind(cosine()), steps=0, hidden=(200, 100), activation="tanh")
    for a, b, start in zip(ours, stock, initial, strict=True):
        assert np.abs(b - start).max() > 1e-3  # every variable moved
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_large_variable_without_gradient_stays_put():
    keras.utils.set_random_seed(1)
    used, unused = keras.Variable(np.ones((200, 100), np.float32)), keras.Variable(np.ones((200, 100), np.float32))
    optimizer = Adam(1e-2)
    optimizer.build([used, unused])
    optimizer.apply_gradients([(tf.ones((200, 100)), used)])
    np.testing.assert_array_equal(unused.numpy(), np.ones((200, 100), np.float32))
    np.testing.assert_allclose(used.numpy(), 1.0 - 1e-2, rtol=1e-6)  # Adam's first step: lr * sign(g)


def test_fused_round_trips_through_keras_config():
    optimizer = Adam(cosine(), fused=False)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is Adam
    assert again.fused is False
