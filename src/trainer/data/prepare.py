"""From a data option to what the loop trains on: build the source, split it, hold it or stream it, fit the
preprocessing on the training split.

Every source, built-in or yours, goes through `load`: its function is called with the keys it names (the
shared settings of conf/data_defaults.yaml go only to functions that take them), and what it returns is
turned into a `Dataset` by `prepare`. What a function may return is the plug-in contract (README: Your own
data): `Examples`, a `Dataset`, a `tf.data.Dataset` of unbatched (x, y), a pair (train, val) of those,
arrays `(x, y)`, or `((x, y), (x_val, y_val))`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainer.config import TrainerError, build, check_data_settings, conf_dir, first_line
from trainer.data.core import BLOCK, Dataset, Examples, Stream, check_numbers, check_values, split, val_mask
from trainer.data.scaling import target_scale
from trainer.data.weights import class_weights, sample_weights

CONTRACT = (
    "expected trainer.data.Examples, a tf.data.Dataset of unbatched (x, y) pairs, a pair (train, val) of "
    "datasets, arrays (x, y), or ((x, y), (x_val, y_val)) (README: Your own data)"
)


@functools.cache
def shared_defaults() -> dict[str, Any]:
    """conf/data_defaults.yaml, the one home of the shared settings' values."""
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "data_defaults.yaml"))


def settings(node: DictConfig) -> DictConfig:
    """The shared settings of a data option; those it leaves out (your own option) take the defaults."""
    values = {k: node.get(k, v) for k, v in shared_defaults().items()}
    out = OmegaConf.create(values)
    check_data_settings(out)
    return out


def load(node: DictConfig) -> Dataset:
    """Build the option's source and prepare it (split, memory or stream, preprocessing)."""
    partial = build(node, _partial_=True)
    fn = partial.func
    accepted = _accepted(fn)
    kwargs = {k: v for k, v in partial.keywords.items() if accepted is None or k in accepted}
    name = f"data._target_={node.get('_target_')}"
    unused = [k for k in partial.keywords if k not in kwargs and k not in shared_defaults()]
    if unused and fn.__module__.startswith("trainer.data"):  # `+data.augment=...` on a table was dropped without a
        # word; your own function gets the keys it names (README: Your own data), so only the built-in readers check
        takes = ", ".join(sorted(accepted)) or "nothing"
        raise TrainerError(f"data.{unused[0]} is no setting of {name} (it takes {takes}, and the shared settings "
                           f"{', '.join(shared_defaults())}); remove it")  # fmt: skip
    try:
        result = fn(*partial.args, **kwargs)
    except TrainerError:
        raise
    except Exception as e:  # a user's reader: one line naming it, as `build` does for the other groups
        raise TrainerError(f"{name} failed: {type(e).__name__}: {first_line(e)}") from e
    s = settings(node)
    _check_folds(s, result, accepted, name)
    data = prepare(result, s, name)
    data.class_weight = class_weights(data, s.class_weight)
    data.sample_weight = sample_weights(result.weights if isinstance(result, Examples) else None, data, s)
    table = isinstance(result, Examples) and result.table
    data.target_scale = target_scale(data, s.target_scale, table)
    if isinstance(result, Examples) and result.schema is not None:
        data.schema, data.raw_example = result.schema, result.raw_example
    elif table and result.columns and len(result.columns) >= data.n_features:
        data.feature_names = [str(c) for c in result.columns[: data.n_features]]
    return data


def _check_folds(s: DictConfig, result: Any, accepted: set[str] | None, name: str) -> None:
    """data.folds where the source chose the validation rows itself would change nothing: one line instead."""
    if not s.folds:
        return
    split_itself = isinstance(result, Dataset) and accepted is not None and "folds" not in accepted
    own_val = isinstance(result, tuple | list) and len(result) == 2 and not _is_array(result[0])
    own_val = own_val or (isinstance(result, dict) and "val" in result)
    own_val = own_val or (isinstance(result, Examples) and result.val is not None)
    if split_itself or own_val:
        raise TrainerError(
            f"data.folds={s.folds}: {name} gives its own validation split, so folds would change "
            "nothing; remove data.folds, or return the examples unsplit (README: Your own data)"
        )


def _accepted(fn: Any) -> set[str] | None:
    """The keyword names `fn` takes; None when it takes any (**kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


# --- what a source returned ----------------------------------------------------------------------
def prepare(result: Any, s: DictConfig, name: str = "data") -> Dataset:
    """A source's result as a Dataset ready for the loop (see the module docstring for what it may be)."""
    if isinstance(result, Dataset):  # split already (the synthetic sources)
        if str(s.in_memory).lower() == "false" and not result.streamed:
            result = _as_streams(result)
        return _fit_preprocessing(result, s, numeric=True)
    examples = as_examples(result, name)  # an explicit validation set wins over data.val_fraction
    return _prepare_examples(examples, s, name)


def as_examples(result: Any, name: str) -> Examples:
    """The accepted shapes of a source's result, as Examples; anything else is one line naming the function."""
    import tensorflow as tf

    if isinstance(result, Examples):
        return result
    if isinstance(result, tf.data.Dataset):
        return _from_tf(result, name)
    if isinstance(result, dict) and set(result) <= {"train", "val"} and "train" in result:
        return _with_val(as_examples(result["train"], name), result.get("val"), name)
    if isinstance(result, tuple | list) and len(result) == 2:
        first, second = result
        if _is_array(first) and _is_array(second):
            return _from_arrays(np.asarray(first), np.asarray(second), name)
        if isinstance(first, tf.data.Dataset | tuple | list | Examples):
            return _with_val(as_examples(first, name), second, name)
    kind = f"a {type(result).__name__}" + (f" of {len(result)} items" if isinstance(result, tuple | list) else "")
    raise TrainerError(f"{name} returned {kind}; {CONTRACT}")


def _is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) or (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "__array__"))


def _with_val(train: Examples, val: Any, name: str) -> Examples:
    if val is not None:
        train.val = as_examples(val, name)
    return train


def _from_arrays(x: np.ndarray, y: np.ndarray, name: str) -> Examples:
    if len(x) != len(y):
        raise TrainerError(f"{name} returned x with {len(x)} rows and y with {len(y)}; they must match")
    check_numbers(x, y, f"{name} returned")
    return Examples(len(x), x.shape[1:], y.shape[1:], str(x.dtype), str(y.dtype), arrays=(x, y), source=name)


def _from_tf(ds: Any, name: str) -> Examples:
    import tensorflow as tf

    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise TrainerError(f"{name} returned a tf.data.Dataset of {spec}; expected (x, y) pairs")
    for part, what in ((spec[0], "x"), (spec[1], "y")):  # strings: one line, as for arrays (core.check_numbers)
        if not (part.dtype.is_floating or part.dtype.is_integer or part.dtype.is_bool):
            raise TrainerError(f"{name} returned a tf.data.Dataset whose {what} is {part.dtype.name}; x and y must be "
                               "numbers (text: write a CSV or Parquet file and use data=csv or data=parquet, whose "
                               "typed columns encode it; class names: map them to ids 0..k-1)")  # fmt: skip
    if spec[0].shape.rank and spec[0].shape[0] is None and spec[1].shape.rank and spec[1].shape[0] is None:
        ds, spec = ds.unbatch(), ds.unbatch().element_spec  # batched: the trainer batches itself
    count = int(ds.cardinality())
    if count < 0:  # unknown or infinite: one counting pass (no values are kept)
        if count == tf.data.INFINITE_CARDINALITY:
            raise TrainerError(f"{name} returned an infinite tf.data.Dataset; drop its .repeat() (epochs do that)")
        count = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
    x_shape, y_shape = tuple(spec[0].shape), tuple(spec[1].shape)
    if None in x_shape or None in y_shape:
        raise TrainerError(f"{name}: examples of shape {x_shape} -> {y_shape}; every example must have a fixed shape")
    return Examples(count, x_shape, y_shape, spec[0].dtype.name, spec[1].dtype.name, read=lambda: ds, source=name)


# --- split, memory or stream ---------------------------------------------------------------------
def _prepare_examples(ex: Examples, s: DictConfig, name: str) -> Dataset:
    if ex.count < 1:
        raise TrainerError(f"{ex.source}: no examples")
    in_memory = str(s.in_memory).lower()
    hold = in_memory == "true" or (in_memory == "auto" and _total_bytes(ex) <= s.memory_limit_mb * 2**20)
    import tensorflow as tf

    from trainer.data.files import read_error

    try:  # a stream's passes (targets, statistics) read every example: a bad one is one line, as in training
        data = _in_memory(ex, s) if hold else _streamed(ex, s)
        return _fit_preprocessing(data, s, numeric=ex.numeric, rescale=ex.rescale, augment=ex.augment,
                                  scaled=ex.scaled)  # fmt: skip
    except tf.errors.OpError as e:
        error = read_error(e)
        if error is None:
            raise
        named = ex.diagnose() if ex.diagnose is not None else None  # a stream's error that names no file
        raise (named or error) from None


def _task(s: DictConfig) -> str | None:
    """data.task, None for auto (inferred)."""
    return None if s.get("task", "auto") == "auto" else s.task


def _total_bytes(ex: Examples) -> int:
    return ex.nbytes + (ex.val.nbytes if ex.val is not None else 0)


def _arrays(ex: Examples) -> tuple[np.ndarray, np.ndarray]:
    if ex.arrays is not None:
        x, y = ex.arrays() if callable(ex.arrays) else ex.arrays
        return np.asarray(x), np.asarray(y)
    xs, ys = [], []
    for xb, yb in ex.blocks().as_numpy_iterator():
        xs.append(xb)
        ys.append(yb)
    return np.concatenate(xs), np.concatenate(ys)


def _in_memory(ex: Examples, s: DictConfig) -> Dataset:
    x, y = _arrays(ex)
    task, y, n_classes = targets(y, ex, _task(s))
    columns = ex.columns
    if ex.val is None:
        data = _split_arrays(x, y, s, task, ex.source, columns)
    else:
        xv, yv = _arrays(ex.val)
        _, yv, _ = targets(yv, ex.val, task)
        for a, b, what in ((x, y, ex.source), (xv, yv, ex.val.source)):
            check_values(a.reshape(len(a), -1), what, columns or [])
            check_values(b.reshape(len(b), -1) if b.dtype.kind == "f" else b[:, None], what, [])
        data = Dataset(_features(x), y, _features(xv), yv, task)
    data.n_classes, data.labels = n_classes or data.n_classes, list(ex.labels) if ex.labels else None
    return data


def _features(x: np.ndarray) -> np.ndarray:
    """Floats as float32 (the step's dtype); integer images stay as they are (4x smaller on the device)."""
    return x.astype(np.float32) if x.dtype.kind == "f" or x.ndim == 2 else x


def _split_arrays(x: np.ndarray, y: np.ndarray, s: DictConfig, task: str, source: str, columns) -> Dataset:
    n_x = int(np.prod(x.shape[1:]))
    names = list(columns) if columns and len(columns) >= n_x else None
    data = split(x, y, s.val_fraction, s.seed, task, source, names, folds=s.folds, fold=s.fold)
    data.x_train = _features(data.x_train)
    data.x_val = None if data.x_val is None else _features(data.x_val)
    return data


def targets(y: np.ndarray, ex: Examples, task: str | None = None) -> tuple[str, np.ndarray, int | None]:
    """The task the targets make, and the targets as the loop takes them.

    binary: one 0/1 column (or two labels), float32 [n, 1]; multiclass: class ids int32 [n] (several labels,
    or an integer column of more than two values), or one-hot rows as given; regression: float32 [n, k].
    """
    task = task or ex.task or infer_task(y, ex.labels)
    if task in ("binary", "multiclass") and not ex.labels and y.ndim <= 2 and y.reshape(len(y), -1).shape[1] == 1:
        _check_class_ids(np.unique(y), len(y), task, ex.source)
    n_classes = None
    if task == "binary":
        y = y.reshape(len(y), -1).astype(np.float32)
    elif task == "multiclass" and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        y = y.reshape(len(y)).astype(np.int32)
        n_classes = len(ex.labels) if ex.labels else int(y.max()) + 1
    elif task == "multiclass":
        y = y.astype(np.float32)
        n_classes = y.shape[1]
    else:
        y = y.reshape(len(y), -1).astype(np.float32) if y.ndim == 1 else y.astype(np.float32)
    return task, y, n_classes


MAX_INFERRED_CLASSES = 100  # a target of whole numbers 0..k-1 is read as k classes up to this k


MIN_EXAMPLES_PER_CLASS = 3  # fewer a class on average: the "class ids" are a measurement's values


def _check_class_ids(values: np.ndarray, rows: int, task: str, source: str) -> None:
    """A class task's one target column must hold class ids: whole numbers >= 0 (0/1 for binary), each class
    with a few examples: diabetes' 214 values in 442 rows were taken as 347 classes and trained to 0.01."""
    whole = np.array_equal(values, np.round(values)) and values.min() >= 0
    fits = whole and (task != "binary" or values.max() <= 1)
    fits = fits and (len(values) <= 2 or rows >= MIN_EXAMPLES_PER_CLASS * len(values))
    if not fits:
        kind = "0/1" if task == "binary" else "0..k-1"
        shown = ", ".join(f"{v:.6g}" for v in values[:5])
        raise TrainerError(f"{source}: data.task={task} needs class ids {kind} in the target; found {len(values)} "
                           f"values in {rows} rows ({shown}, ...): set data.task=regression")  # fmt: skip


def infer_task(y: np.ndarray, labels) -> str:
    """binary, multiclass or regression, from the targets' values (the rule README: Data states).

    Labels (strings): two are binary, more multiclass. One column of 0/1: binary. One column of every whole
    number 0..k-1 (k <= MAX_INFERRED_CLASSES), integer or float: k classes. One-hot rows: multiclass.
    Anything else is regression: a count or a price of whole numbers that do not start at 0 is not taken for
    classes; `data.task` says otherwise where the rule guesses wrong."""
    if labels:
        return "binary" if len(labels) == 2 else "multiclass"
    flat = y.reshape(len(y), -1)
    if flat.shape[1] == 1:
        values = np.unique(flat)
        if np.isin(values, (0, 1)).all():
            return "binary"
        k = len(values)
        whole = np.array_equal(values, np.arange(k))
        return "multiclass" if whole and k <= MAX_INFERRED_CLASSES else "regression"
    if flat.shape[1] > 1 and np.isin(flat, (0.0, 1.0)).all() and (flat.sum(axis=1) == 1).all():
        return "multiclass"
    return "regression"


def _streamed(ex: Examples, s: DictConfig) -> Dataset:
    """Train and validation as streams: the split is a filter by example index against `val_mask`."""
    import tensorflow as tf

    blocks = ex.blocks or _reader_of_arrays(ex)
    task, n_classes = _task(s) or ex.task, len(ex.labels) if ex.labels else None
    if task is None or (task == "multiclass" and n_classes is None):  # the targets only, once
        if ex.arrays is not None and not callable(ex.arrays):  # memory-mapped: y alone is read
            ys = np.asarray(ex.arrays[1])
        else:
            ys = np.concatenate([yb for _, yb in blocks().as_numpy_iterator()])
        task, _, n_classes = targets(ys, ex, task)
    targets_of = _block_targets(task)
    if ex.val is not None:
        val_blocks = ex.val.blocks or _reader_of_arrays(ex.val)
        train = Stream(None, ex.count, ex.diagnose, _in_blocks(blocks, lambda i, x, y: (x, targets_of(y))))
        val = Stream(None, ex.val.count, ex.val.diagnose, _in_blocks(val_blocks, lambda i, x, y: (x, targets_of(y))))
    else:
        mask = val_mask(ex.count, s.val_fraction, s.seed, s.folds, s.fold)
        n_val = int(mask.sum())
        table = tf.constant(mask)
        del mask

        def part(want_val: bool):
            def pick(i, x, y):  # block i's rows of this split: the mask's slice for rows i*BLOCK...
                rows = tf.range(i * BLOCK, i * BLOCK + tf.cast(tf.shape(x)[0], tf.int64))
                keep = tf.gather(table, rows) == want_val
                return tf.boolean_mask(x, keep), targets_of(tf.boolean_mask(y, keep))

            return _in_blocks(blocks, pick)

        train = Stream(None, ex.count - n_val, ex.diagnose, part(False))
        val = Stream(None, n_val, ex.diagnose, part(True)) if n_val else None
    one_value = int(np.prod(ex.y_shape)) == 1  # a class id per example, integer or float (a CSV's 0..9 column)
    y_shape = {"binary": (1,), "multiclass": () if one_value else ex.y_shape}.get(
        task, ex.y_shape if ex.y_shape else (1,)
    )
    labels = list(ex.labels) if ex.labels else None
    data = Dataset(None, None, None, None, task, train=train, val=val, n_classes=n_classes, labels=labels,
                   x_shape=tuple(ex.x_shape), y_shape=tuple(y_shape))  # fmt: skip
    data.y_dtype = "int32" if task == "multiclass" and y_shape == () else "float32"
    return data


def _as_streams(data: Dataset) -> Dataset:
    """Arrays as streams (data.in_memory=false on an in-memory source): the same examples, the same order."""

    def stream(x, y):
        if x is None:
            return None
        specs = (x.shape[1:], x.dtype.name), (y.shape[1:], y.dtype.name)
        return Stream(None, len(x), blocks=lambda: _array_blocks(x, y, *specs))

    out = Dataset(None, None, None, None, data.task, stream(data.x_train, data.y_train), stream(data.x_val, data.y_val),
                  data.n_classes, data.labels, x_shape=data.x_shape, y_shape=data.y_shape)  # fmt: skip
    out.y_dtype = data.y_dtype
    return out


def _in_blocks(blocks, fn):
    """blocks()'s rows in blocks of exactly BLOCK (the last one shorter) and `fn(block index, x, y)` on each.

    Per block, not per example: a function per example (enumerate, filter by the validation mask, the targets'
    map) held the 1 GiB stream benchmark to ~95 batches of 256 a second; per block, ~3,400 (scripts/bench
    --stream, docs/performance.md: Streamed data). `rebatch` cuts a reader's chunks without a per-row op."""
    import tensorflow as tf

    def split_blocks():
        ds = blocks().rebatch(BLOCK).enumerate()
        return ds.map(lambda i, xy: fn(i, *xy), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return split_blocks


def _block_targets(task: str):
    """`targets` on a block of streamed targets [B, ...]: class ids int32 [B] for a multiclass target of one value
    whatever its dtype (a float [1] one batched to [b, 1] was scored as a binary logit: a streamed CSV of digits
    logged val accuracy 0.13 at val loss 0.06; held in memory, 0.98), float32 [B, k] otherwise."""
    import tensorflow as tf

    def fn(y):
        per_example = y.shape[1:]
        if task == "multiclass" and per_example.num_elements() == 1:
            return tf.reshape(tf.cast(y, tf.int32), [-1])
        y = tf.cast(y, tf.float32)
        return tf.reshape(y, [tf.shape(y)[0], -1]) if per_example.rank == 0 or task == "binary" else y

    return fn


def _reader_of_arrays(ex: Examples):
    """Stream arrays in blocks (memory-mapped ones are read a block at a time, never whole)."""

    def blocks():
        x, y = ex.arrays() if callable(ex.arrays) else ex.arrays
        return _array_blocks(x, y, (ex.x_shape, ex.x_dtype), (ex.y_shape, ex.y_dtype))

    return blocks


def _array_blocks(x: np.ndarray, y: np.ndarray, x_spec: tuple, y_spec: tuple):
    """Rows of x and y, BLOCK at a time, as (shape per row, dtype) say."""
    import tensorflow as tf

    from trainer.data.files import _rows  # memory-mapped .npy: plain reads, so RSS stays one block

    def rows(start):
        start = int(start)
        return _rows(x, start, BLOCK), np.array(y[start : start + BLOCK])  # copies, as _rows says why

    spec = [tf.TensorSpec([None, *shape], dtype) for shape, dtype in (x_spec, y_spec)]
    starts = tf.data.Dataset.range(0, len(x), BLOCK)
    blocks = starts.map(
        lambda s: tf.numpy_function(rows, [s], [spec[0].dtype, spec[1].dtype], stateful=False),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return blocks.map(lambda a, b: (tf.ensure_shape(a, spec[0].shape), tf.ensure_shape(b, spec[1].shape)))


# --- preprocessing -------------------------------------------------------------------------------
def _fit_preprocessing(data: Dataset, s: DictConfig, numeric: bool, rescale: float | None = None,
                       augment: dict | None = None, scaled: np.ndarray | None = None) -> Dataset:  # fmt: skip
    """Statistics of the training split only (mean/variance or min/max per feature), kept on the Dataset:
    the input side applies them before the model, and the logged model carries them in front of it."""
    pre: dict[str, Any] = {}
    if rescale:
        pre["rescale"] = float(rescale)
    if augment:
        pre["augment"] = dict(augment)
    if s.normalize != "none" and numeric:
        lo, hi, mean, var = _statistics(data)
        if s.normalize == "standard":
            pre["mean"], pre["variance"] = mean, var
        else:  # minmax: (x - min) / (max - min), as a Normalization layer
            pre["mean"], pre["variance"] = lo, np.square(hi - lo)
        if scaled is not None:  # a typed table's indicators and encodings stay as they are (columns.TableSchema)
            pre["mean"] = np.where(scaled, pre["mean"], 0.0).astype(np.float32)
            pre["variance"] = np.where(scaled, pre["variance"], 1.0).astype(np.float32)
    data.preprocess = pre
    return data


def _statistics(data: Dataset) -> tuple[np.ndarray, ...]:
    """Per-feature min, max, mean and variance of the training split, in float64 (one pass for a stream)."""
    if not data.streamed:
        x = data.x_train.reshape(len(data.x_train), -1).astype(np.float64)
        lo, hi, mean, var = x.min(0), x.max(0), x.mean(0), x.var(0)
    else:
        n, total, squares, lo, hi = 0, 0.0, 0.0, np.inf, -np.inf
        for xb, _ in data.train.blocks().as_numpy_iterator():
            xb = xb.reshape(len(xb), -1).astype(np.float64)
            n, total, squares = n + len(xb), total + xb.sum(0), squares + np.square(xb).sum(0)
            lo, hi = np.minimum(lo, xb.min(0)), np.maximum(hi, xb.max(0))
        mean = total / n
        var = np.maximum(squares / n - np.square(mean), 0.0)
    shape = data.x_shape
    return tuple(np.asarray(a, dtype=np.float32).reshape(shape) for a in (lo, hi, mean, var))


def preprocessing_layers(pre: dict[str, Any]) -> list:
    """The fitted preprocessing as Keras layers: what the logged model puts in front of the trained one."""
    import keras

    layers = []
    if "rescale" in pre:
        layers.append(keras.layers.Rescaling(pre["rescale"], name="rescale"))
    if "mean" in pre:
        axis = tuple(range(1, np.ndim(pre["mean"]) + 1)) or -1
        layers.append(keras.layers.Normalization(axis=axis if len(axis) > 1 else -1, mean=pre["mean"],
                                                 variance=pre["variance"], name="normalize"))  # fmt: skip
    return layers


def relabel(data: Dataset, labels: list[str] | None) -> Dataset:
    """Class ids of `data` renumbered to `labels` (the names by id a model was trained with): a file whose
    classes are a subset, or sort differently, is still scored against the ids the model learnt."""
    if not labels or not data.labels or list(data.labels) == list(labels):
        return data
    unknown = [name for name in data.labels if name not in labels]
    if unknown:
        raise TrainerError(f"the data has classes the model never saw: {unknown[:5]} (it knows {labels[:10]})")
    mapping = np.array([labels.index(name) for name in data.labels])
    binary = data.task == "binary"
    if binary and len(labels) != 2:
        raise TrainerError(f"the data has 2 classes {data.labels} but the model was trained on {len(labels)}")

    def renumber(y: np.ndarray) -> np.ndarray:
        return mapping[y.astype(np.int64)].astype(y.dtype)

    if data.streamed:
        import tensorflow as tf

        table = tf.constant(mapping)

        def renumbered(x, y):
            return x, tf.cast(tf.gather(table, tf.cast(y, tf.int64)), y.dtype)

        data.train = data.train.mapped(renumbered)
        data.val = data.val.mapped(renumbered) if data.val is not None else None
    else:
        data.y_train = renumber(data.y_train)
        data.y_val = None if data.y_val is None else renumber(data.y_val)
    data.labels, data.n_classes = list(labels), len(labels) if not binary else data.n_classes
    return data
