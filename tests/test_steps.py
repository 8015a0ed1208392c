"""The step contract (trainer/steps): the supervised step with Keras' regularization losses, SAM, adversarial
training, several optimizers, and steps that break the contract, on real data (scikit-learn's tables)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_diabetes, load_digits

from trainer.inputs import ArrayInput
from trainer.loop import StepLoop
from trainer.metrics import Metrics
from trainer.steps import SAM, Adversarial, Ops, Step, StepError, Supervised


def diabetes(n: int = 320) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return x[:n], ((y - y.mean()) / y.std()).astype(np.float32)[:n, None]


class Penalty(keras.layers.Layer):
    """A layer that adds its own loss (a VAE's KL term is the same mechanism)."""

    def call(self, h):
        self.add_loss(0.05 * tf.reduce_mean(tf.square(h)))
        return h


def regularized_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    h = keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01),
                           activity_regularizer=keras.regularizers.L1(1e-3))(inputs)  # fmt: skip
    return keras.Model(inputs, keras.layers.Dense(1)(Penalty()(h)))


def test_regularization_losses_are_trained_and_logged_as_keras_fit_reports_them():
    x, y = diabetes()
    steps, batch = 30, 32
    loop = StepLoop(regularized_model(), keras.losses.MeanSquaredError(), keras.optimizers.SGD(0.05),
                    ArrayInput(x, y, batch, shuffle=False), None, batch)  # fmt: skip
    out = loop.run(steps)
    ours, reg = out["train/loss"].numpy(), out["train/regularization"].numpy()

    keras_model = regularized_model()
    keras_model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    per_epoch = len(x) // batch
    theirs = [keras_model.train_on_batch(x[(i % per_epoch) * batch :][:batch], y[(i % per_epoch) * batch :][:batch])
              for i in range(steps)]  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert (reg > 0.01).all() and (reg < ours).all()  # the penalty is a real share of the loss, logged on its own
    for a, b in zip(loop.model.weights, keras_model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_a_model_without_regularizers_logs_todays_metrics_bitwise_as_a_hand_written_tape_loop():
    x, y = diabetes()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    loop = StepLoop(model, keras.losses.MeanSquaredError(), keras.optimizers.Adam(1e-2),
                    ArrayInput(x, y, 32, shuffle=False), None, 32)  # fmt: skip
    out = {k: v.numpy() for k, v in loop.run(300).items() if k.startswith("train/")}
    assert set(out) == {"train/loss", "train/lr", "train/grad_norm", "train/grad_norm_by_var/"}

    opt, mse = keras.optimizers.Adam(1e-2), keras.losses.MeanSquaredError()
    opt.build(twin.trainable_variables)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = mse(yb, twin(xb, training=True))
        grads = tape.gradient(loss, twin.trainable_variables)
        opt.apply_gradients(zip(grads, twin.trainable_variables, strict=True))
        return loss

    losses = [step(x[(i % 10) * 32 :][:32], y[(i % 10) * 32 :][:32]).numpy() for i in range(300)]
    np.testing.assert_array_equal(out["train/loss"], np.array(losses, np.float32))
    for a, b in zip(model.weights, twin.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_losses_equal_a_hand_written_sam_loop(adaptive):
    x, y = diabetes()
    rho, lr, steps = (0.5 if adaptive else 0.05), 0.05, 60

    def make():
        keras.utils.set_random_seed(2)
        return keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])

    mse = keras.losses.MeanSquaredError()
    step = SAM(make(), mse, keras.optimizers.SGD(lr, momentum=0.9), rho=rho, adaptive=adaptive)
    loop = StepLoop(step, None, None, ArrayInput(x, y, 32, shuffle=False), None, 32, seed=0)
    loop.check_step()
    ours = loop.run(steps)["train/loss"].numpy()

    model, opt = make(), keras.optimizers.SGD(lr, momentum=0.9)
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function
    def sam_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = mse(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        if adaptive:
            norm = tf.linalg.global_norm([tf.abs(v) * g for v, g in zip(variables, grads, strict=True)])
            eps = [rho * tf.square(v) * g / (norm + 1e-12) for v, g in zip(variables, grads, strict=True)]
        else:
            norm = tf.linalg.global_norm(grads)
            eps = [rho * g / (norm + 1e-12) for g in grads]
        saved = [tf.identity(v) for v in variables]
        for v, e in zip(variables, eps, strict=True):
            v.assign_add(e)
        with tf.GradientTape() as tape:
            perturbed = mse(yb, model(xb, training=True))
        sharp = tape.gradient(perturbed, variables)
        for v, w in zip(variables, saved, strict=True):
            v.assign(w)
        opt.apply_gradients(zip(sharp, variables, strict=True))
        return loss

    theirs = [sam_step(x[(i % 10) * 32 :][:32], y[(i % 10) * 32 :][:32]).numpy() for i in range(steps)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert ours[-1] < 0.8 * ours[0]  # it trains


def digits() -> tuple[np.ndarray, ...]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype(np.int32)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def test_adversarial_training_on_digits_resists_fgsm_better_than_the_standard_step():
    x, y, xv, yv = digits()
    eps, loss = 0.15, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    for name in ("standard", "adversarial"):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
        )
        attack = Adversarial(model, loss, keras.optimizers.Adam(3e-3), epsilon=eps, steps=1, step_size=None,
                             adversarial_weight=0.5, clip=[0.0, 1.0])  # fmt: skip
        step = attack if name == "adversarial" else Supervised(model, loss, attack.optimizer)
        loop = StepLoop(step, None, None, ArrayInput(x, y, 64, seed=3), None, 64)
        loop.run(1500)
        val = loop.evaluate(xv, yv, Metrics(["accuracy"], "multiclass", sparse=True))
        fgsm = attack.eval_extra((tf.constant(xv), tf.constant(yv)))["adversarial_accuracy"]
        results[name] = (float(val["accuracy"]), float(fgsm))
        if name == "adversarial":  # the step's own validation reports the same number
            assert float(val["adversarial_accuracy"]) == pytest.approx(float(fgsm), abs=1e-6)
    print("clean / FGSM accuracy:", results)
    (clean_std, fgsm_std), (clean_adv, fgsm_adv) = results["standard"], results["adversarial"]
    assert clean_std > 0.93 and clean_adv > 0.9
    assert fgsm_adv > fgsm_std + 0.15, results


# --- steps that break the contract: one line naming the step and the fix, before training --------------------
def small_model() -> keras.Model:
    return keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])


class _Base(Supervised):
    def __init__(self):
        super().__init__(small_model(), keras.losses.MeanSquaredError(), keras.optimizers.SGD(0.01))


class VectorLoss(_Base):
    def train_step(self, batch, ops):
        ops.minimize(self.optimizer, lambda b: tf.square(b[1] - self.model(b[0])), batch)


class TwoApplies(_Base):
    def train_step(self, batch, ops):
        ops.minimize(self.optimizer, self.objective, batch)
        ops.minimize(self.optimizer, self.objective, batch)


class NoApply(_Base):
    def train_step(self, batch, ops):
        ops.gradients(self.optimizer, self.objective, batch)


class ClashingLogs(_Base):
    logs = ("loss",)


class UndeclaredLog(_Base):
    def train_step(self, batch, ops):
        ops.minimize(self.optimizer, self.objective, batch)
        ops.log("extra", tf.constant(1.0))


class HostSync(_Base):
    def train_step(self, batch, ops):
        loss = ops.minimize(self.optimizer, self.objective, batch)
        print(float(loss.numpy()))


class Untrained(_Base):
    def __init__(self):
        super().__init__()
        self.teacher = small_model()

    def build(self, batch):
        super().build(batch)
        self.teacher(batch[0])


class NonScalarLog(_Base):
    logs = ("residuals",)

    def train_step(self, batch, ops):
        ops.minimize(self.optimizer, self.objective, batch)
        return {"residuals": batch[1] - self.model(batch[0])}


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (VectorLoss, "has shape (32, 1), not a scalar"),
        (TwoApplies, "'optimizer' is applied twice"),
        (NoApply, "'optimizer' is never applied"),
        (ClashingLogs, "`logs` names loss twice or as a name the framework logs"),
        (UndeclaredLog, "ops.log('extra') is not declared in `logs`"),
        (HostSync, "train_step cannot be traced"),
        (Untrained, "model 'teacher' has trainable variables no optimizer trains"),
        (NonScalarLog, "the value logged as 'residuals' has shape (32, 1), not a scalar"),
    ],
)
def test_a_step_that_breaks_the_contract_fails_before_training_naming_the_step(step, message):
    x, y = diabetes()
    with pytest.raises(StepError) as caught:
        loop = StepLoop(step(), None, None, ArrayInput(x, y, 32), None, 32)
        loop.check_step()
    text = str(caught.value)
    assert text.startswith(f"step {step.__qualname__}: ") and message in text, text
    assert "\n" not in text


class LazyVariable(_Base):
    """Creates a variable inside train_step: tf.function traces such a function twice."""

    counter = None

    def train_step(self, batch, ops):
        if self.counter is None:
            self.counter = tf.Variable(0.0)
        self.counter.assign_add(1.0)
        ops.minimize(self.optimizer, self.objective, batch)


def test_a_step_whose_chunk_traces_more_than_once_is_refused_at_the_second_call():
    x, y = diabetes()
    loop = StepLoop(LazyVariable(), None, None, ArrayInput(x, y, 32), None, 32)
    loop.run(3)
    with pytest.raises(StepError, match=r"step LazyVariable: the compiled chunk was traced 2 times by call 2"):
        loop.run(3)


class TwoPlayers(Step):
    """Two models and two optimizers, a declared scalar and a stateless draw: the metric names of several."""

    trains = {"first": ("a",), "second": ("b",)}
    logs = ("noise",)

    def __init__(self):
        super().__init__()
        self.a, self.b = small_model(), small_model()
        self.first, self.second = keras.optimizers.SGD(0.01), keras.optimizers.Adam(1e-3)

    def build(self, batch):
        self.a(batch[0]), self.b(batch[0])

    def train_step(self, batch, ops: Ops):
        ops.minimize(self.first, lambda b: tf.reduce_mean(tf.square(b[1] - self.a(b[0]))), batch)
        ops.minimize(self.second, lambda b: tf.reduce_mean(tf.square(b[1] - self.b(b[0]))), batch)
        return {"noise": tf.random.stateless_uniform([], ops.seed(5))}

    def eval_step(self, batch):
        x, y = batch
        return {"loss": tf.reduce_mean(tf.square(y - self.a(x)))}


def test_several_optimizers_get_their_own_names_and_the_same_draws_on_the_same_step():
    x, y = diabetes()
    loop = StepLoop(TwoPlayers(), None, None, ArrayInput(x, y, 32), None, 32, seed=4)
    loop.check_step()
    out = {k: v.numpy() for k, v in loop.run(12).items() if k.startswith("train/")}
    assert set(out) == {
        "train/loss", "train/grad_norm", "train/grad_norm_by_var/", "train/noise",
        *(f"train/{o}/{m}" for o in ("first", "second") for m in ("loss", "lr", "grad_norm")),
    }  # fmt: skip
    assert loop.variable_names == ["a/dense/kernel", "a/dense/bias", "b/dense_1/kernel", "b/dense_1/bias"] or all(
        n.startswith(("a/", "b/")) for n in loop.variable_names
    )
    np.testing.assert_allclose(out["train/loss"], out["train/first/loss"] + out["train/second/loss"], rtol=1e-6)
    np.testing.assert_allclose(out["train/first/lr"], 0.01)
    norms = out["train/grad_norm_by_var/"]
    np.testing.assert_allclose(out["train/first/grad_norm"], np.sqrt((norms[:, :2] ** 2).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(out["train/grad_norm"], np.sqrt((norms**2).sum(1)), rtol=1e-5)
    # ops.seed is a pure function of (seed, step): the draws do not repeat, and a second loop draws the same
    again = StepLoop(TwoPlayers(), None, None, ArrayInput(x, y, 32), None, 32, seed=4)
    np.testing.assert_array_equal(again.run(12)["train/noise"].numpy(), out["train/noise"])
    assert len(set(out["train/noise"].tolist())) == 12
    assert set(loop.evaluate(x, y)) == {"loss"}


def test_gradient_accumulation_and_clipping_apply_to_a_steps_own_optimizers():
    """accumulate_steps=4 of 8 is one step of 32: the same loss; clipping caps every optimizer's norm."""
    x, y = diabetes()
    big = StepLoop(TwoPlayers(), None, None, ArrayInput(x, y, 32, shuffle=False), None, 32, seed=4)
    keras.utils.set_random_seed(0)
    micro = StepLoop(TwoPlayers(), None, None, ArrayInput(x, y, 8, shuffle=False, accumulate_steps=4), None, 8,
                     seed=4, accumulate_steps=4)  # fmt: skip
    for v, w in zip(micro.variables, big.variables, strict=True):
        v.assign(w)
    a, b = big.run(5), micro.run(5)
    np.testing.assert_allclose(a["train/first/loss"], b["train/first/loss"], rtol=1e-5)
    np.testing.assert_allclose(a["train/second/grad_norm"], b["train/second/grad_norm"], rtol=1e-4)


def test_clipping_caps_each_optimizers_update_and_a_nonfinite_step_names_the_optimizer():
    x, y = diabetes()
    loop = StepLoop(TwoPlayers(), None, None, ArrayInput(x, y, 32), None, 32, clip_norm=1e-3)
    first = loop.ops.variables(loop.step_impl.first)
    before = [v.numpy().copy() for v in first]
    out = loop.run(1)
    moved = np.sqrt(sum(((v.numpy() - w) ** 2).sum() for v, w in zip(first, before, strict=True)))
    assert out["train/first/grad_norm"].numpy()[0] > 0.1  # logged before clipping
    assert moved == pytest.approx(0.01 * 1e-3, rel=1e-3)  # SGD(0.01) on a gradient clipped to norm 1e-3

    class Diverging(TwoPlayers):
        def train_step(self, batch, ops):
            ops.minimize(self.first, lambda b: tf.reduce_mean(tf.square(b[1] - self.a(b[0]))), batch)
            ops.minimize(self.second, lambda b: tf.reduce_mean(tf.math.log(self.b(b[0]) * 0.0 - 1.0)), batch)
            return {"noise": tf.constant(0.0)}

    loop = StepLoop(Diverging(), None, None, ArrayInput(x, y, 32), None, 32)
    out = loop.run(5)
    assert int(out["steps"]) == 0
    assert loop.describe_nonfinite(out) == " of optimizer 'second'"
    assert loop.describe_variable(3) == "b/" + loop.variable_names[3].split("/", 1)[1] + " (optimizer second)"
