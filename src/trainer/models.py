"""Built-in models. Any callable `model(x, training=...)` with `trainable_variables` works in their place.

Their settings have no defaults here: conf/model/*.yaml holds them, and Hydra passes every key."""

from __future__ import annotations

import keras

from trainer.config import NO_HIDDEN_LAYER, _require


@keras.saving.register_keras_serializable(package="trainer")
class Linear(keras.Model):
    """y = x @ w + b, with variables named `w` and `b` as in the GradientTape introduction."""

    def __init__(self, units: int, w_init: float | None, b_init: float, **kwargs):
        super().__init__(**kwargs)
        self.units, self.w_init, self.b_init = units, w_init, b_init

    def build(self, input_shape) -> None:
        w_init = "glorot_uniform" if self.w_init is None else keras.initializers.Constant(self.w_init)
        self.w = self.add_weight(name="w", shape=(input_shape[-1], self.units), initializer=w_init)
        self.b = self.add_weight(name="b", shape=(self.units,), initializer=keras.initializers.Constant(self.b_init))

    def call(self, x, training: bool = False):
        return x @ self.w + self.b

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units, "w_init": self.w_init, "b_init": self.b_init}


@keras.saving.register_keras_serializable(package="trainer")
class MLP(keras.Model):
    """Dense layers with `activation` between them and a linear head; also the classifier (logits head)."""

    def __init__(self, hidden: list[int], units: int, activation: str, dropout: float, **kwargs):
        super().__init__(**kwargs)
        _require(len(hidden) >= 1, "model.hidden", list(hidden), NO_HIDDEN_LAYER)  # however it was built
        self.hidden, self.units, self.activation, self.dropout = list(hidden), units, activation, dropout
        self.blocks = [keras.layers.Dense(h, activation=activation, name=f"dense_{i}") for i, h in enumerate(hidden)]
        self.drop = keras.layers.Dropout(dropout) if dropout else None
        self.head = keras.layers.Dense(units, name="head")

    def call(self, x, training: bool = False):
        for block in self.blocks:
            x = block(x)
            if self.drop is not None:
                x = self.drop(x, training=training)
        return self.head(x)

    def get_config(self) -> dict:
        extra = {
            "hidden": self.hidden,
            "units": self.units,
            "activation": self.activation,
            "dropout": self.dropout,
        }
        return {**super().get_config(), **extra}
