"""trainer.optim's fused Adam/AdamW against Keras' own: the same numbers, bitwise, and its fallbacks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import option_kwargs
from trainer.models import MLP
from trainer.optim import Adam, AdamW, Schedule

STEPS = 30


def trained(
    optimizer: keras.Optimizer, extra_variable: bool = False, steps: int = STEPS
) -> tuple[list[np.ndarray], keras.Optimizer]:
    """`steps` compiled updates of a small MLP on fixed data; its weights afterwards."""
    keras.utils.set_random_seed(1)
    model = MLP(**option_kwargs("model", "mlp", hidden=[16, 8], units=1))
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
    assert optimizer._flat
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
    assert not built._flat
    assert "flat_momentum" not in [v.path.rsplit("/", 1)[-1] for v in built.variables]
    for a, b in zip(ours, stock, strict=True):
        assert np.array_equal(a, b)


def test_fused_round_trips_through_keras_config():
    optimizer = Adam(cosine(), fused=False)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is Adam
    assert again.fused is False
