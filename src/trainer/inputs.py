"""The loop's input side: where each step's batch comes from. The step itself never knows.

- `ArrayInput`: data that fits in memory stays on the device as tensors; a step gathers its batch by index
  from the epoch's seeded order (a stateless shuffle of (seed, epoch)), so the data position is a pure
  function of the step and a resume needs nothing but the step.
- `StreamInput`: a `tf.data` pipeline per epoch (read in blocks, cache, shuffle in windows with a seed of
  (seed, epoch), batch, prefetch); its iterator goes into the compiled call, which takes K batches from it as
  Keras' multi-step train function does. A resume rebuilds the epoch's pipeline and skips the batches already taken.

Both hand the step float32 inputs with the fitted preprocessing applied (data/prepare.py: rescale,
normalization) and, in training only, the augmentation layers. Tables are normalized once, up front, on
the device; integer images are cast and scaled per batch so they stay 4x smaller while held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from trainer.config import TrainerError
from trainer.data.core import Stream
from trainer.data.files import read_error
from trainer.data.prepare import preprocessing_layers

MAX_ROWS = 1024  # steps per compiled call at most: the loop's rows buffer length (loop.py)
MIN_EPOCH_FOR_CUTS = 32  # epochs of fewer batches: the new-epoch test runs in the step (cheaper than calls)
_plain_graph = tf.autograph.experimental.do_not_convert


class Transform:
    """Cast to float32, the fitted preprocessing, and (training only) augmentation: the same arithmetic as
    the layers the logged model carries in front of the trained one (data/prepare.preprocessing_layers)."""

    def __init__(self, preprocess: dict[str, Any] | None, example_shape: tuple[int, ...] = (), seed: int = 0):
        preprocess = dict(preprocess or {})
        self.layers = preprocessing_layers(preprocess)
        self.augment = _augmentation(preprocess.get("augment"), example_shape, seed)

    def seed_states(self) -> list[tf.Variable]:
        """The augmentation layers' random-generator states: checkpointed, so a resumed run draws on as the
        uninterrupted one would have."""
        states = []
        for layer in self.augment:
            for v in getattr(layer, "non_trainable_variables", []):
                states.append(getattr(v, "value", v))
        return states

    def __call__(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        for layer in self.layers:
            x = layer(x)
        if training:
            for layer in self.augment:
                x = layer(x, training=True)
        return x


def _seeds(transform: Transform) -> dict[str, list[tf.Variable]]:
    states = transform.seed_states()
    return {"augment_seeds": states} if states else {}


def _augmentation(settings: dict | None, shape: tuple[int, ...], seed: int) -> list:
    if not settings:
        return []
    from trainer.data.files import augmentation_layers

    return augmentation_layers(settings, shape, seed)


class ArrayInput:
    """Batches gathered by index from tensors held on the device."""

    streamed = False

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0, shuffle: bool = True,
                 preprocess: dict | None = None, accumulate_steps: int = 1,
                 sample_weight: np.ndarray | None = None):  # fmt: skip
        self.transform = Transform(preprocess, tuple(x.shape[1:]), seed)
        upfront = x.dtype.kind == "f" and not self.transform.augment  # tables: once, here; images: per batch
        self.x = self.transform(tf.constant(x)) if upfront and self.transform.layers else tf.constant(x)
        self.per_batch = not upfront and (bool(self.transform.layers) or x.dtype != np.float32)
        self.y = tf.constant(y)
        self.w = None if sample_weight is None else tf.constant(sample_weight, tf.float32)  # a third batch part
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.n = int(x.shape[0])
        self.steps_per_epoch = self.n // batch_size  # the ragged last batch is dropped: shapes stay fixed
        # Chunks end at epoch boundaries, so the new epoch's order is drawn once, before a chunk's loop;
        # tiny epochs (and micro-batches, which straddle them) test for a new epoch in every step instead.
        self.cut_at_epochs = accumulate_steps == 1 and self.steps_per_epoch >= MIN_EPOCH_FOR_CUTS
        self._held: tuple | None = None  # the validation split, converted once (eval_arrays)

    def build(self) -> None:
        """Variables, created under the strategy's scope by the loop."""
        self.order = tf.Variable(self._epoch_order(tf.constant(0, tf.int64)), trainable=False, name="order")

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the input side."""
        return {"order": self.order, **_seeds(self.transform)}

    def example(self, n: int) -> tf.Tensor:
        """The first n inputs as the model sees them (builds the model's variables)."""
        return self._features(self.x[:n])

    def _features(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.transform(x, training) if self.per_batch or (training and self.transform.augment) else x

    def call_limit(self, step: int) -> int:
        epoch_end = self.steps_per_epoch - step % self.steps_per_epoch if self.cut_at_epochs else MAX_ROWS
        return min(MAX_ROWS, epoch_end)

    def begin_chunk(self, step: tf.Variable) -> None:
        """Traced at the start of a chunk: where chunks are cut at epoch ends, draw the epoch's order once."""
        if self.cut_at_epochs and step % self.steps_per_epoch == 0:
            self.order.assign(self._epoch_order(step // self.steps_per_epoch))

    def batch(self, index: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Batch number `index` of the run: a slice of its epoch's seeded order (resumable from the step)."""
        position = index % self.steps_per_epoch
        if not self.cut_at_epochs and position == 0:  # the Python flag short-circuits at trace time
            self.order.assign(self._epoch_order(index // self.steps_per_epoch))
        start = tf.cast(position, tf.int32) * self.batch_size
        idx = self.order[start : start + self.batch_size]
        x, y = self._features(tf.gather(self.x, idx), training=True), tf.gather(self.y, idx)
        return (x, y) if self.w is None else (x, y, tf.gather(self.w, idx))

    @_plain_graph
    def _epoch_order(self, epoch: tf.Tensor) -> tf.Tensor:
        return epoch_order(self.n, self.seed, epoch) if self.shuffle else tf.range(self.n)

    def release(self) -> None:
        """Nothing to drop: held tensors have no reader (StreamInput.release)."""

    def eval_arrays(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(x, y) of a split as evaluation takes them (default: the training set), preprocessed."""
        if x is None:
            return (self.x if not self.per_batch else self.transform(self.x)), self.y
        if self._held is None or self._held[0] is not x:  # converted once, then held on the device
            self._held = (x, self.transform(tf.constant(x)), tf.constant(y))
        return self._held[1], self._held[2]


class StreamInput:
    """Batches from a tf.data pipeline built per epoch; its iterator is an argument of the compiled call."""

    streamed = True

    def __init__(self, stream: Stream, batch_size: int, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 10000, cache: str | None = None, preprocess: dict | None = None,
                 strategy: tf.distribute.Strategy | None = None):  # fmt: skip
        self.stream, self.batch_size, self.seed, self.shuffle = stream, batch_size, seed, shuffle
        self.shuffle_buffer, self.cache = shuffle_buffer, cache
        self.transform = Transform(preprocess, tuple(stream.read().element_spec[0].shape), seed)
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = self.strategy is not tf.distribute.get_strategy()
        self.n = stream.count
        self.steps_per_epoch = self.n // batch_size
        self.cut_at_epochs = True
        self._base = None
        self._iterator, self._iterator_step = None, -1

    def build(self) -> None:
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_epoch")
        self.epoch_start = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_epoch_start")

    def state(self) -> dict[str, Any]:
        return {"input_epoch": self.epoch, "input_epoch_start": self.epoch_start, **_seeds(self.transform)}

    def example(self, n: int) -> tf.Tensor:
        x, _ = next(iter(self.stream.read().batch(n)))
        return self.transform(x)

    def features(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.transform(x, training)

    def call_limit(self, step: int) -> int:
        _, start = self._epoch_at(step)
        return min(MAX_ROWS, self.steps_per_epoch - (step - start))

    # --- host side, between calls --------------------------------------------------------------
    def _epoch_at(self, step: int) -> tuple[int, int]:
        """(epoch, its first step) for `step`: the recorded epoch, moved on by the epochs that ended since."""
        epoch, start = int(self.epoch.numpy()), int(self.epoch_start.numpy())
        done = (step - start) // self.steps_per_epoch
        return epoch + done, start + done * self.steps_per_epoch

    def iterator(self, step: int):
        """The iterator the next call takes its batches from, positioned at `step` (once per chunk)."""
        epoch, start = self._epoch_at(step)
        if epoch != int(self.epoch.numpy()):  # an epoch ended (or several, at a resume): the next one starts
            self.epoch.assign(epoch)
            self.epoch_start.assign(start)
            self._iterator = None
        if self._iterator is None or self._iterator_step != step:
            self._iterator = self._make_iterator(epoch, step - start)
        self._iterator_step = step
        return self._iterator

    def release(self) -> None:
        """Training is over: drop the epoch's iterator now. Left to the interpreter's exit, a reader of Python
        (a generator: .npy, Parquet, CSV) whose next block is being fetched by tf.data's threads can hang the
        process: the iterator's destructor waits for that call, which waits for the finalizing interpreter."""
        self._iterator, self._iterator_step = None, -1

    def advanced(self, step: int, exhausted: bool) -> None:
        """After a call: the iterator now stands at `step`; an exhausted one starts the next epoch."""
        self._iterator_step = step
        if exhausted:
            self.epoch.assign_add(1)
            self.epoch_start.assign(step)
            self._iterator, self._iterator_step = None, -1

    def _make_iterator(self, epoch: int, skip: int):
        if not self.distributed:
            return iter(self.dataset(epoch, self.batch_size).skip(skip))
        per_replica = self.batch_size // self.replicas

        def fn(ctx: tf.distribute.InputContext):
            ds = self.dataset(epoch, per_replica, ctx)
            return ds.skip(skip * self.replicas // ctx.num_input_pipelines)

        return iter(self.strategy.distribute_datasets_from_function(fn))

    def dataset(self, epoch: int, batch: int, ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        """Epoch `epoch`'s batches: the same for the same (seed, epoch), so a resume sees what was left."""
        ds = self._cached()
        if ctx is not None and ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)  # each pipeline its own blocks
        if self.shuffle:
            ds = shuffled(ds, self.shuffle_buffer, epoch_seed(self.seed, epoch))
        return ds.rebatch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _cached(self) -> tf.data.Dataset:
        """The source's blocks of rows, cached once (memory or file) and shared by every epoch's pipeline."""
        if self._base is None:
            ds = self.stream.blocks()
            if self.cache:
                ds = ds.cache("" if self.cache == "memory" else self.cache)
            options = tf.data.Options()
            options.deterministic = True
            self._base = ds.with_options(options)
        return self._base

    def eval_dataset(self, stream: Stream | None, batch: int) -> tf.data.Dataset:
        """A split (default: the training set) in its fixed order, in evaluation batches."""
        ds = stream.blocks() if stream is not None else self._cached()
        return ds.rebatch(batch).prefetch(tf.data.AUTOTUNE)


def shuffled(blocks: tf.data.Dataset, window: int, seed: int) -> tf.data.Dataset:
    """The rows of `blocks` in windows of `window` rows (data.shuffle_buffer), each window's rows in a random
    order of (seed, window index): every row once, the windows in the source's order.

    What tf.data's `shuffle(window)` did per row (a buffer of `window` rows drawn from at random, refilled in the
    source's order: the same reach), on whole windows at once: that per-row shuffle, with the per-row batch
    after it, was most of the input's cost, 807 us of CPU per batch of 256 on the 1 GiB stream benchmark's
    .npy against 95 us for this (2 cores; the pipeline alone ran 2,149 batches/s, now 18,259)."""

    def permuted(index: tf.Tensor, rows: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
        pair = tf.stack([tf.constant(seed, tf.int64), index])
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(rows[0])[0]), seed=pair)
        return tuple(tf.gather(part, order) for part in rows)

    windows = blocks.rebatch(window).enumerate()
    return windows.map(permuted, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@contextlib.contextmanager
def reading(stream: Stream | None = None) -> Iterator[None]:
    """A source's one-line error raised while a stream reads (a bad cell deep in a file), as that line: tf.data
    hands it over wrapped in an op error ("... TrainerError: <line>") with TensorFlow's own traceback text. An
    error that cannot say which file (an image that does not decode) asks the stream's source to name it."""
    try:
        yield
    except tf.errors.OpError as e:
        error = read_error(e) or _read_failure(e)
        if error is None:
            raise
        named = stream.diagnose() if stream is not None and stream.diagnose is not None else None
        raise (named or error) from None


def _read_failure(error: tf.errors.OpError) -> TrainerError | None:
    """Any other error of the input pipeline (a file truncated or deleted mid-run, a corrupt Parquet page, a
    leftover cache lockfile) as one line naming the file; None for errors not raised by reading (the model's).
    These were 44-81-line tracebacks, and the run's `error` tag `Graph execution error:`."""
    import re

    text = error.message or str(error)
    if not re.search(r"Iterator|Dataset|generator|TFRecord|ReadFile", text):
        return None
    lock = re.search(r"cache lockfile already exists \('([^']+)'\)", text)
    if lock:
        return TrainerError(
            f"data.cache: {lock.group(1)} is left from a run that was stopped or is still "
            "running: resume the run (it removes its own), or delete the file if no run uses it"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("[[")]
    reasons = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b[^:]*: ", line)]
    why = reasons[-1] if reasons else lines[0] if lines else type(error).__name__
    why = re.sub(r"^\{\{[^}]*\}\}\s*", "", why)[:300]  # not TensorFlow's "{{function_node __wrapped__...}}"
    path = re.search(r"(/[^\s'\",;()\[\]]+\.\w+)", text)
    where = f" ({path.group(1)})" if path and path.group(1) not in why else ""
    return TrainerError(f"reading the data failed{where}: {why}; check the file, or restore it and resume the run")


@_plain_graph
def epoch_order(n: int, seed: int, epoch: tf.Tensor | int) -> tf.Tensor:
    """The row order of epoch `epoch`: a stateless shuffle of range(n) seeded by (seed, epoch), so the data
    position is a pure function of the step. Public: the bench's competitors draw their batches from it."""
    pair = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    # a seeded Fisher-Yates shuffle: ~1 ms for 65,536 rows here, where argsort of uniforms took ~8 ms
    return tf.random.experimental.stateless_shuffle(tf.range(n), seed=pair)


def epoch_seed(seed: int, epoch: int) -> int:
    """tf.data's shuffle seed for one epoch of a run: distinct per (seed, epoch), fixed across processes."""
    return (seed * 1_000_003 + epoch * 7919 + 1) % (2**31 - 1)
