"""Built-in models. Any callable `model(x, training=...)` with `trainable_variables` works in their place.

Their settings have no defaults here: conf/model/*.yaml holds them, and Hydra passes every key."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainer import finetune
from trainer.config import NO_HIDDEN_LAYER, TrainerError, _require, build, causes, close_names, first_line


def _known_units(units: int | None) -> int:
    """`units: null` means "the data's output count"; the trainer fills it in before building."""
    if units is None:
        raise TrainerError("model.units=null: the number of outputs was not filled in from the data; set model.units=N")
    return units


@keras.saving.register_keras_serializable(package="trainer")
class Linear(keras.Model):
    """y = x @ w + b, with variables named `w` and `b` as in the GradientTape introduction."""

    def __init__(self, units: int | None, w_init: float | None, b_init: float, **kwargs):
        super().__init__(**kwargs)
        self.units, self.w_init, self.b_init = _known_units(units), w_init, b_init

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

    def __init__(self, hidden: list[int], units: int | None, activation: str, dropout: float,
                 freeze: Sequence[str] | None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        _require(len(hidden) >= 1, "model.hidden", list(hidden), NO_HIDDEN_LAYER)  # however it was built
        self.hidden, self.units, self.activation, self.dropout = list(hidden), _known_units(units), activation, dropout
        self.blocks = [keras.layers.Dense(h, activation=activation, name=f"dense_{i}") for i, h in enumerate(hidden)]
        self.drop = keras.layers.Dropout(dropout) if dropout else None
        self.head = keras.layers.Dense(self.units, name="head")
        self.freeze = finetune.freeze(self, freeze)

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
            "freeze": self.freeze,
        }
        return {**super().get_config(), **extra}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> MLP:
        return cls(**{"freeze": None, **config})  # a model saved before `freeze` existed


# --- image and layer-stack models ---------------------------------------------------------------
def _as_input(x, dtype: str):
    """Images as the layers take them: a channel axis for [b, H, W] (grey images), and floats (uint8 pixels
    would reach Conv2D as ints, which it refuses)."""
    x = x if isinstance(x, keras.KerasTensor) else keras.ops.convert_to_tensor(x)  # symbolic: portable()
    x = keras.ops.expand_dims(x, -1) if len(x.shape) == 3 else x
    return keras.ops.cast(x, dtype)


def _channel_shape(input_shape) -> tuple:
    """A per-example shape with its channel axis: [H, W] -> (H, W, 1)."""
    shape = tuple(input_shape)
    return (*shape, 1) if len(shape) == 2 else shape


def _require_images(option: str, shape: Sequence[int]) -> None:
    """model=cnn and keras_app convolve images: a table's rows reached Conv2D (a hint to move a Flatten) or
    keras.applications ("tuple index out of range")."""
    if len(shape) != 3:
        raise TrainerError(
            f"model={option} takes images [height, width, channels] (or [height, width]), but the examples have "
            f"shape {tuple(shape)}: use model=mlp for a table, or model=sequential"
        )


class _Stack(keras.Model):
    """A model that is an ordered list of layers (`self.stack`), the last one its head: the one order that `call`
    runs and `check_fits` walks, so the layer a shape error names is the layer that would have failed."""

    stack: list
    where = "layers"  # how check_fits names the i-th layer of the stack
    images = True  # [b, H, W] gets a channel axis and pixels become floats; a layer list takes its input as it is

    def call(self, x, training: bool = False):
        x = _as_input(x, self.compute_dtype) if self.images else x
        for layer in self.stack:
            x = layer(x, training=training)  # Keras passes `training` on only to layers whose call takes it
        return x


@keras.saving.register_keras_serializable(package="trainer")
class CNN(_Stack):
    """Conv blocks (Conv2D 'same', then BatchNorm, activation, max-pool, dropout) per entry of `filters`, a
    Flatten, dense `hidden` layers and a linear head of `units` outputs; for any [H, W, C] (or [H, W]) input.

    Every layer is named by its place (`conv_0`, `bn_0`, `dense_0`, `head`), so variable paths, and so the metric
    names of their gradient norms, are the same in every run of a process (Keras numbers unnamed layers)."""

    def __init__(
        self,
        filters: list[int],
        kernel_size: int,
        pool: int | None,
        batch_norm: bool,
        dropout: float,
        hidden: list[int],
        activation: str,
        units: int | None,
        freeze: Sequence[str] | None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters, self.hidden, self.units = list(filters), list(hidden), _known_units(units)
        self.kernel_size, self.pool, self.batch_norm = kernel_size, pool, batch_norm
        self.dropout, self.activation = dropout, activation
        self.stack = [layer for i, f in enumerate(self.filters) for layer in self._block(i, f)]
        self.stack.append(keras.layers.Flatten(name="flatten"))
        for i, h in enumerate(self.hidden):
            self.stack.append(keras.layers.Dense(h, activation=activation, name=f"dense_{i}"))
            if dropout:
                self.stack.append(keras.layers.Dropout(dropout, name=f"dense_dropout_{i}"))
        self.stack.append(keras.layers.Dense(self.units, name="head"))
        self.freeze = finetune.freeze(self, freeze)

    def _block(self, i: int, filters: int) -> list:
        # A bias before BatchNorm is cancelled by its mean: the conv has none then (as Keras' own applications)
        layers = [keras.layers.Conv2D(filters, self.kernel_size, padding="same", use_bias=not self.batch_norm,
                                      name=f"conv_{i}")]  # fmt: skip
        if self.batch_norm:
            layers.append(keras.layers.BatchNormalization(name=f"bn_{i}"))
        layers.append(keras.layers.Activation(self.activation, name=f"act_{i}"))
        if self.pool:
            layers.append(keras.layers.MaxPooling2D(self.pool, name=f"pool_{i}"))
        if self.dropout:
            layers.append(keras.layers.Dropout(self.dropout, name=f"dropout_{i}"))
        return layers

    def get_config(self) -> dict:
        keys = ("filters", "kernel_size", "pool", "batch_norm", "dropout", "hidden", "activation", "units", "freeze")
        return {**super().get_config(), **{k: getattr(self, k) for k in keys}}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> CNN:
        return cls(**{"freeze": None, **config})  # a model saved before `freeze` existed


def _snake(name: str) -> str:
    """Conv2D -> conv2d, BatchNormalization -> batch_normalization: Keras' own layer naming."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


def _layer(node: Any, i: int) -> keras.layers.Layer:
    """model.layers[i] as a Keras layer: a config node with a `_target_` (built by Hydra, named `<class>_<i>` unless
    it names itself, so its variables' paths do not depend on how many models the process built before), or a
    layer already built (from_config deserializes them)."""
    if isinstance(node, keras.layers.Layer):
        return node
    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
        raise TrainerError(f"model.layers[{i}]={node!r} is invalid: expected a layer such as "
                           "{_target_: keras.layers.Dense, units: 64}")  # fmt: skip
    target = node["_target_"]
    module, _, cls = target.rpartition(".")
    if module == "keras.layers" and not hasattr(keras.layers, cls):
        layers = [n for n in dir(keras.layers) if n[:1].isupper()]
        raise TrainerError(f"model.layers[{i}]._target_={target!r} is no Keras layer: {close_names(cls, layers)}")
    # Detached from the model's config, so Hydra's messages name the layer's own keys; model.layers[i] says where
    node = OmegaConf.create(OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node))
    name = {} if "name" in node else {"name": f"{_snake(cls)}_{i}"}
    try:
        layer = build(node, **name)
    except TrainerError as e:
        sep = "." if str(e).startswith("_target_=") else ": "  # _target_='my.Layer' cannot be imported: ...
        raise TrainerError(f"model.layers[{i}]{sep}{e}") from None
    if not isinstance(layer, keras.layers.Layer):
        raise TrainerError(f"model.layers[{i}]._target_={node._target_!r} built a {type(layer).__name__}, "
                           "not a Keras layer; name a class such as keras.layers.Dense")  # fmt: skip
    return layer


@keras.saving.register_keras_serializable(package="trainer")
class Sequential(_Stack):
    """The layers of `model.layers` in order, each any Keras layer declared in YAML (`{_target_:
    keras.layers.Conv2D, filters: 32, kernel_size: 3}`), then a linear head of `units` outputs."""

    where = "model.layers"  # its stack is the config's list, then the head
    images = False  # an LSTM takes [b, T, F] and an Embedding integer ids: the list's first layer says what it takes

    def __init__(self, layers: Sequence[Any], units: int | None, freeze: Sequence[str] | None, **kwargs):
        super().__init__(**kwargs)
        self.units = _known_units(units)
        self.stack = [_layer(node, i) for i, node in enumerate(layers)]
        self.stack.append(keras.layers.Dense(self.units, name="head"))
        self.freeze = finetune.freeze(self, freeze)

    def get_config(self) -> dict:
        layers = [keras.saving.serialize_keras_object(layer) for layer in self.stack[:-1]]
        return {**super().get_config(), "layers": layers, "units": self.units, "freeze": self.freeze}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> Sequential:
        """Layers from a saved model through Keras' own deserializer (safe_mode applies), never through Hydra: a
        `.keras` file must not name code to run."""
        layers = [keras.saving.deserialize_keras_object(c, custom_objects=custom_objects) for c in config["layers"]]
        return cls(**{"freeze": None, **config, "layers": layers})


# --- keras.applications ------------------------------------------------------------------------
def applications() -> dict[str, Any]:
    """The model builders of keras.applications by name (MobileNetV3Small, ResNet50, ...): its modules (resnet,
    imagenet_utils) are no models."""
    return {n: getattr(keras.applications, n) for n in dir(keras.applications) if n[:1].isupper()}


@keras.saving.register_keras_serializable(package="trainer")
class KerasApp(keras.Model):
    """A keras.applications network without its top (`include_top=False`), pooled (`pooling`: avg | max) to one
    vector per example, then a linear head of `units` outputs. `weights`: null (random: nothing to download) or
    `imagenet` (needs the network once, and 3 channels).

    `name` is the application's name here, not the Keras model's (which stays `keras_app`)."""

    def __init__(
        self,
        name: str,
        weights: str | None,
        pooling: str,
        units: int | None,
        input_shape: Sequence[int] | None,
        freeze: Sequence[str] | None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        apps = applications()
        if name not in apps:
            raise TrainerError(f"model.name={name!r} is no keras.applications model: {close_names(name, apps)}")
        if input_shape is None:
            raise TrainerError("model.input_shape=null: the image shape was not filled in from the data; "
                               "set model.input_shape=[H,W,C]")  # fmt: skip
        self.application, self.weights_source, self.pooling = name, weights, pooling
        self.units, self.app_input_shape = _known_units(units), list(input_shape)
        shape = _channel_shape(input_shape)
        _require_images("keras_app", shape)
        try:
            self.backbone = apps[name](include_top=False, weights=weights, input_shape=shape, pooling=pooling)
        except ValueError as e:  # "Input size must be at least 32x32; Received: input_shape=(8, 8, 1)"
            smallest = re.search(r"at least (\d+)x(\d+)", str(e))
            fix = (
                f"; resize the images (data=image_folder: data.image_size=[{smallest[1]}, {smallest[2]}])"
                if smallest
                else ""
            )
            raise TrainerError(
                f"model.name={name!r} cannot take images of shape {shape}: {first_line(e)}{fix}"
            ) from None
        self.head = keras.layers.Dense(self.units, name="head")
        self.freeze = finetune.freeze(self, freeze)

    def call(self, x, training: bool = False):
        return self.head(self.backbone(_as_input(x, self.compute_dtype), training=training))

    def get_config(self) -> dict:
        extra = {"name": self.application, "weights": self.weights_source, "pooling": self.pooling,
                 "units": self.units, "input_shape": self.app_input_shape, "freeze": self.freeze}  # fmt: skip
        return {**super().get_config(), **extra}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> KerasApp:
        """A saved model brings its own weights: nothing to download (weights=imagenet would fetch them again)."""
        return cls(**{"freeze": None, **config, "weights": None})


# --- does the model take the data's examples? --------------------------------------------------
MAX_EMBEDDING_DIM = 50  # an embedded column's vector: min(50, (ids + 1) // 2) wide, fastai's first rule


@keras.saving.register_keras_serializable(package="trainer")
class Embedded(keras.Model):
    """`inner` behind a typed table's embedded categorical columns (data/columns.py: above MAX_ONE_HOT values):
    each such column of x holds ids, which become learned vectors (keras.layers.Embedding), joined after the other
    columns before `inner` sees them. Trained with `inner`, checkpointed and logged with it. Computes in float32
    whatever the policy: ids above 2,048 are not whole numbers in float16."""

    def __init__(self, inner: Any, positions: Sequence[int], sizes: Sequence[int], width: int, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.inner, self.positions, self.sizes, self.width = inner, list(positions), list(sizes), int(width)
        self.rest = [i for i in range(self.width) if i not in set(self.positions)]
        self.tables = [keras.layers.Embedding(n, embedding_dim(n), name=f"embedding_{k}")
                       for k, n in enumerate(self.sizes)]  # fmt: skip

    @staticmethod
    def inner_width(width: int, sizes: Sequence[int]) -> int:
        """What `inner` takes: the other columns, then each embedded column's vector."""
        return width - len(sizes) + sum(embedding_dim(n) for n in sizes)

    def call(self, x, training: bool = False):
        return self.inner(self.joined(x), training=training)

    def joined(self, x):
        """What `inner` takes: the other columns, then each embedded column's vector."""
        x = keras.ops.cast(x, "float32")
        ids = [keras.ops.cast(x[:, p], "int32") for p in self.positions]
        rest = keras.ops.take(x, np.asarray(self.rest, dtype="int32"), axis=1)
        parts = [rest, *(table(i) for table, i in zip(self.tables, ids, strict=True))]
        return keras.ops.concatenate(parts, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "inner": keras.saving.serialize_keras_object(self.inner),
                "positions": self.positions, "sizes": self.sizes, "width": self.width}  # fmt: skip

    @classmethod
    def from_config(cls, config: dict) -> Embedded:
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("inner")), **config)


def embedding_dim(ids: int) -> int:
    return min(MAX_EMBEDDING_DIM, (ids + 1) // 2)


# --- the logged model: Keras' own layers only ---------------------------------------------------
LINEAR_LAYER = "linear"  # a Linear's Dense in its portable graph (the model's own name is numbered per process)


def portable(model: Any, shape: Sequence[int], dtype: str, before: Sequence[Any] = (), after: Sequence[Any] = (),
             name: str | None = None) -> keras.Model:  # fmt: skip
    """`model` as a functional keras.Model of Keras' built-in layers and ops, between `before` and `after` (the
    fitted preprocessing, the targets' units): the `.keras` file a run logs.

    Keras 3 imports the classes a saved model names from Keras' own packages only: a file naming
    trainer.models.CNN loaded only after `import trainer.models` ("Could not locate class 'CNN'"), where this one
    loads with a bare `keras.saving.load_model`, safe_mode on. The graph shares `model`'s layers, and so its
    weights (a Linear's w and b are copied into a Dense: from_portable copies them back). A model of your own
    class stays whole inside it, as Keras saves any model (loading it needs your module, as it always did)."""
    inputs = keras.Input(tuple(shape), dtype=dtype)
    x = inputs
    for layer in before:
        x = layer(x)
    x = _graph(model, x)
    for layer in after:
        x = layer(x)
    return keras.Model(inputs, x, name=name or model.name)


def _graph(model: Any, x: Any) -> Any:
    """`model` applied to the symbolic `x` layer by layer: the built-in models' `call` run on a KerasTensor
    adds their layers, not the model, to the graph (training=None: a layer's training flag stays the caller's)."""
    kind = type(model)
    if kind is Linear:
        if not model.built:
            model.build(tuple(x.shape))
        dense = keras.layers.Dense(model.units, name=LINEAR_LAYER, dtype=model.dtype_policy)
        y = dense(x)
        dense.set_weights([model.w.numpy(), model.b.numpy()])
        return y
    if kind is Embedded:
        return _graph(model.inner, model.joined(x))
    if kind in (MLP, CNN, Sequential, KerasApp):
        return model.call(x, training=None)
    return model(x)


def from_portable(model: Any, graph: keras.Model) -> None:
    """After weights were set in `portable(model, ...)`'s graph: the ones it copied (a Linear's) back into `model`."""
    if type(model) is Linear:
        model.set_weights(next(layer for layer in graph.layers if layer.name == LINEAR_LAYER).get_weights())


def check_fits(model: Any, input_shape: Sequence[int]) -> None:
    """Raise a one-line TrainerError when `model` cannot take examples of `input_shape`, naming the first layer that
    cannot and the shape it was given; before any training, on symbolic tensors (no data flows).

    A layer stack is walked layer by layer (each builds its variables for the shape it gets, as the first batch
    would build them); any other model is called whole."""
    images = isinstance(model, KerasApp) or getattr(model, "images", False)
    shape = (None, *(_channel_shape(input_shape) if images else input_shape))
    if isinstance(model, CNN):
        _require_images("cnn", shape[1:])
    if not isinstance(model, _Stack):
        if isinstance(model, keras.Model):  # any other callable: its first batch will tell
            _check_whole(model, shape)
        return
    x = keras.KerasTensor(shape)
    for i, layer in enumerate(model.stack):
        where = f"{model.where}[{i}] ({type(layer).__name__} {layer.name!r})"
        if layer is model.stack[-1] and len(x.shape) > 2:
            raise TrainerError(f"the head {where} gets input of shape {x.shape}, not one vector per example; "
                               "end model.layers with a keras.layers.Flatten or GlobalAveragePooling2D")  # fmt: skip
        try:
            x = layer(x)
        except Exception as e:  # Keras raises ValueError or TypeError, whatever the layer
            hint = _hint(layer, x, first=i == 0)
            raise TrainerError(f"{where} cannot take input of shape {x.shape}: {_reason(e)}{hint}") from None


def _check_whole(model: keras.Model, shape: tuple) -> None:
    """A model that is no layer stack: symbolically, else (a subclassed model Keras cannot trace symbolically,
    such as one computing `x @ self.w`) on one example of zeros, which builds it as its first batch would."""
    try:
        model.compute_output_spec(keras.KerasTensor(shape))
        return
    except Exception:
        pass
    try:
        model(np.zeros((1, *shape[1:]), dtype=np.float32))
    except Exception as e:  # any failure of the user's model is a shape it cannot take
        raise TrainerError(f"model {type(model).__name__} cannot take input of shape {shape}: {_reason(e)}"
                           f"{SINGLE_NUMBERS if len(shape) == 1 else ''}") from None  # fmt: skip


# x of shape [n] (a 1-D array from np.save or your own function): each example is one number, no feature axis
SINGLE_NUMBERS = "; the examples are single numbers (x of shape [n]): give x a feature axis, shape [n, 1] (x[:, None])"


def _reason(error: BaseException) -> str:
    """The line that says what went wrong: Keras wraps a layer's error in "Exception encountered when calling
    MaxPooling2D.call()." (the reason is the error it wraps, printed in bold: ANSI codes, dropped here)."""
    lines = [first_line(e) for e in causes(error)]
    line = next((t for t in lines if not t.startswith("Exception encountered when calling")), lines[0])
    return re.sub(r"\x1b\[[0-9;]*m", "", line)


def _hint(layer: keras.layers.Layer, x: keras.KerasTensor, first: bool = False) -> str:
    """The fix for a rank mismatch, read from the layer's input spec (Conv2D: ndim 4; LSTM: ndim 3). The first
    layer gets the examples themselves: nothing before it flattened them."""
    spec = layer.input_spec[0] if isinstance(layer.input_spec, list) else layer.input_spec
    need = getattr(spec, "ndim", None) or getattr(spec, "min_ndim", None)
    if need is None or need == len(x.shape):
        return SINGLE_NUMBERS if len(x.shape) == 1 else ""
    if need > len(x.shape) and first:
        return (
            f"; it takes inputs of rank {need} and the examples have shape {tuple(x.shape[1:])}: start "
            "model.layers with a keras.layers.Reshape, or use data whose examples have that rank"
        )
    if need > len(x.shape):
        return (
            f"; it takes inputs of rank {need}: move it before the layer that flattens, or add a keras.layers.Reshape"
        )
    if need == 2:
        return "; add a keras.layers.Flatten (or a pooling layer) before it"
    return f"; it takes inputs of rank {need}: add a keras.layers.Reshape before it"
