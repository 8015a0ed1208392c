"""Files of examples: NumPy arrays, TFRecord files of tf.train.Example records, and a folder of images per class.

Each reader checks what it can before training (files exist, the first record of every TFRecord file matches
the spec, every image's header opens and gives its size) and hands over `Examples` with both `arrays` (in
memory: memory-mapped, or decoded on the call) and `read` (a `tf.data` stream in the same order).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.config import COLOR_MODES, TFRECORD_COMPRESSION, TrainerError, check_augment, first_line
from trainer.data.core import BLOCK, Examples, check_numbers, regular_files

_LITTLE = sys.byteorder == "little"  # a native-order .npy TensorFlow decodes as little-endian
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what image_dataset_from_directory reads
TF_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # PIL's names of what tf.io.decode_image decodes: a TIFF
# saved as x.png opens in PIL but failed in the stream ("Unknown image file format")
TFRECORD_DTYPES = {"uint8": "bytes_list", "int64": "int64_list", "float32": "float_list"}  # how each is stored
GZIP_MAGIC = b"\x1f\x8b"
ZLIB_SUFFIXES = (".zz", ".zlib", ".z")


def _stack(stream: tf.data.Dataset, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """A stream of (x, y) examples as two arrays (what `arrays()` gives where the values are decoded)."""
    parts = list(stream.batch(batch).as_numpy_iterator())
    if not parts:
        raise TrainerError("no examples to read")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- NumPy -----------------------------------------------------------------------------------------------
def numpy(path: str, y: str | None, x_key: str, y_key: str, rescale: float | None) -> Examples:
    """One .npz file (x and y under x_key, y_key), or two .npy files (path: x, y: y) memory-mapped, so only the
    rows a batch uses are read: a 10 GB array costs no memory until then.

    An .npz is a zip archive (its members may be compressed), which np.load cannot map: its two arrays are read
    into memory. Integer y of shape [n] is class ids; other targets become float32 [n, k].
    """
    source = f"data.path={path!r}"
    if path.lower().endswith(".npz"):
        archive = _npz(path, source)
        keys = ", ".join(archive.files)
        for key, name in ((x_key, "x_key"), (y_key, "y_key")):
            if key not in archive.files:
                raise TrainerError(f"{source} has no array {key!r} (its keys: {keys}); set data.{name}")
        try:
            xs, ys = archive[x_key], archive[y_key]
        except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False"
            raise TrainerError(f"{source}: {first_line(e)} (a pickle could run code); save arrays of numbers, "
                               "e.g. x.astype(np.float32)") from None  # fmt: skip
    elif y is None:
        raise TrainerError(f"{source} is no .npz archive: name the .npy file of the targets with data.y=...")
    else:
        xs, ys = _npy(path, "data.path"), _npy(y, "data.y")
    if xs.ndim == 0 or ys.ndim == 0 or len(xs) != len(ys):
        raise TrainerError(f"{source}: x has shape {xs.shape} and y {ys.shape}; they need the same number of rows")
    check_numbers(xs, ys, f"{source} holds")
    class_ids = ys.ndim == 1 and ys.dtype.kind in "iu"
    y_file, y_rows = ys, [-1] if class_ids else [-1, int(np.prod(ys.shape[1:]))]  # y as the file has it, its rows
    ys = ys.astype(np.int64) if class_ids else ys.reshape(len(ys), -1).astype(np.float32)

    def blocks() -> tf.data.Dataset:
        raw = [_raw_blocks(xs), _raw_blocks(y_file)]
        if all(r is not None for r in raw):  # TensorFlow reads the files itself: no Python, no GIL, per block
            return tf.data.Dataset.zip(tuple(raw)).map(lambda x, y: (x, tf.reshape(tf.cast(y, ys.dtype), y_rows)))

        def chunks():
            for i in range(0, len(xs), BLOCK):
                yield _rows(xs, i, BLOCK), np.array(ys[i : i + BLOCK])  # a copy, as _rows says why

        signature = (
            tf.TensorSpec((None, *xs.shape[1:]), xs.dtype),
            tf.TensorSpec((None, *ys.shape[1:]), ys.dtype),
        )
        return tf.data.Dataset.from_generator(chunks, output_signature=signature)

    return Examples(
        count=len(xs),
        x_shape=tuple(xs.shape[1:]),
        y_shape=tuple(ys.shape[1:]),
        x_dtype=str(xs.dtype),
        y_dtype=str(ys.dtype),
        arrays=(xs, ys),
        blocks=blocks,
        source=source,
        numeric=xs.ndim == 2 and xs.dtype.kind == "f",
        rescale=rescale,
        diagnose=lambda: _resized(xs, "data.path") or _resized(y_file, "data.y"),
    )


def _resized(a: np.ndarray, key: str) -> TrainerError | None:
    """The line for a memory-mapped .npy whose file is not the size it had when the run opened it (cut, grown,
    deleted), else None: TensorFlow's own words for it are about record lengths."""
    if not isinstance(a, np.memmap) or a.filename is None:
        return None
    expected = a.offset + a.nbytes
    try:
        size: int | str = os.path.getsize(a.filename)
    except OSError:
        size = "gone"
    if size == expected:
        return None
    now = "is gone" if size == "gone" else f"is {size:,} bytes where its {len(a):,} rows need {expected:,}"
    return TrainerError(f"{key}={a.filename} {now}: it changed while the run read it; restore it and resume the run")


def _rows(a: np.ndarray, start: int, n: int) -> np.ndarray:
    """Rows start..start+n of `a`. From a memory-mapped .npy they are read with a plain file read: the stream
    then holds one block, where reading through the mapping kept every page it had touched in the process
    (its RSS grew with the file: 1.5 GB for a 1 GB file, measured with the stream benchmark)."""
    if not isinstance(a, np.memmap) or a.filename is None or not a.flags.c_contiguous:
        return np.array(a[start : start + n])  # a copy: TensorFlow may take a returned array's memory as its own
    row = int(np.prod(a.shape[1:], dtype=np.int64))
    count = max(0, min(n, len(a) - start)) * row
    values = np.fromfile(a.filename, dtype=a.dtype, count=count, offset=a.offset + start * row * a.dtype.itemsize)
    return values.reshape(-1, *a.shape[1:])


def _raw_blocks(a: np.ndarray) -> tf.data.Dataset | None:
    """The rows of a memory-mapped .npy, BLOCK at a time, read and decoded by TensorFlow: None where it cannot
    (not a file's map, not C order, big-endian, a dtype decode_raw lacks). The same rows in the same blocks as
    `_rows`, without the GIL: a generator's blocks wait for it while the metric sink's threads hold it."""
    kind_ok = a.dtype.kind in "fiu" and a.dtype.byteorder in "<=|" and (a.dtype.byteorder != "=" or _LITTLE)
    if not isinstance(a, np.memmap) or a.filename is None or not a.flags.c_contiguous or not kind_ok:
        return None
    try:
        dtype = tf.as_dtype(a.dtype.newbyteorder("="))
    except TypeError:
        return None
    row = a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    n, size = len(a), os.path.getsize(a.filename)
    full = n // BLOCK
    parts = []  # (record bytes, where the records start, their count)
    if full:
        parts.append((BLOCK * row, a.offset, full))
    if n > full * BLOCK:
        parts.append(((n - full * BLOCK) * row, a.offset + full * BLOCK * row, 1))
    if not parts or row == 0:
        return None
    reads = [tf.data.FixedLengthRecordDataset(a.filename, length, header_bytes=start,
                                              footer_bytes=size - start - length * count)
             for length, start, count in parts]  # fmt: skip
    records = reads[0] if len(reads) == 1 else reads[0].concatenate(reads[1])
    shape = [-1, *a.shape[1:]]
    return records.map(lambda r: tf.reshape(tf.io.decode_raw(r, dtype, little_endian=True), shape))


def _npy(path: str | None, key: str) -> np.ndarray:
    if path is not None:
        regular_files([path], f"{key}={path!r}")
    if path is None or not Path(path).is_file():
        raise TrainerError(f"{key}={path!r}: no such file (working directory: {Path.cwd()})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise TrainerError(f"{key}={path!r} is not an .npy array file ({str(e).splitlines()[0]})") from None


def _npz(path: str, source: str) -> Any:
    regular_files([path], source)
    if not Path(path).is_file():
        raise TrainerError(f"{source}: no such file (working directory: {Path.cwd()})")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise TrainerError(f"{source} is not an .npz archive ({str(e).splitlines()[0]})") from None


# --- TFRecord --------------------------------------------------------------------------------------------
def tfrecord(
    path: Any, features: dict[str, Any], inputs: Any, target: str, compression: str, rescale: float | None
) -> Examples:
    """tf.train.Example records: `features` says each key's shape and dtype; `inputs` (one key or a list) are x.

    dtype int64 / float32: an int64_list / float_list of prod(shape) values. dtype uint8: one bytes value, the
    raw pixels (prod(shape) bytes, tf.io.decode_raw), or with `encoding: image` a PNG/JPEG/GIF/BMP file
    (tf.io.decode_image). Several inputs are flattened and concatenated as float32. An int64 target of shape
    [] is class ids; any other target is float32 [n, k]. The first record of every file is checked against the
    spec before training; the count is one pass over the records, unparsed.
    """
    source = f"data.path={path!r}"
    names = [inputs] if isinstance(inputs, str) else list(inputs)
    spec = {n: _feature_spec(features, n, "inputs") for n in names}
    spec[target] = _feature_spec(features, target, "target")
    if spec[target]["dtype"] == "uint8":
        raise TrainerError(f"data.target={target!r} has dtype uint8; a target must be int64 (class ids) or float32")
    files = _record_files(path, source)
    codes = [_compression(f, compression) for f in files]
    for f, code in zip(files, codes, strict=True):
        _check_first_record(f, code, spec, source)
    count = _count_records(files, codes, source)
    if count == 0:
        raise TrainerError(f"{source}: the files hold no records")
    single = len(names) == 1
    x_spec = spec[names[0]]
    x_dtype = "uint8" if single and x_spec["dtype"] == "uint8" else "float32"
    x_shape = tuple(x_spec["shape"]) if single else (sum(int(np.prod(spec[n]["shape"])) for n in names),)
    classes = spec[target]["dtype"] == "int64" and not spec[target]["shape"]
    y_shape, y_dtype = ((), "int64") if classes else ((int(np.prod(spec[target]["shape"])),), "float32")

    def example(parsed: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        values = {n: _decoded(parsed[n], spec[n], n, source) for n in spec}
        x = values[names[0]] if single else tf.concat([tf.reshape(values[n], [-1]) for n in names], axis=0)
        y = values[target] if classes else tf.reshape(values[target], y_shape)
        return tf.cast(x, x_dtype), tf.cast(y, y_dtype)

    def read() -> tf.data.Dataset:
        records = tf.data.Dataset.from_tensor_slices((files, codes)).flat_map(tf.data.TFRecordDataset)
        parse = {n: _parse_spec(s) for n, s in spec.items()}
        parsed = records.batch(256).map(lambda r: tf.io.parse_example(r, parse), num_parallel_calls=tf.data.AUTOTUNE)
        return parsed.unbatch().map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    return Examples(
        count=count,
        x_shape=x_shape,
        y_shape=y_shape,
        x_dtype=x_dtype,
        y_dtype=y_dtype,
        arrays=lambda: _stack_records(read()),
        read=read,
        source=source,
        columns=[*names, target] if not single or len(x_shape) == 0 else None,
        numeric=x_dtype == "float32" and len(x_shape) == 1,
        rescale=rescale,
    )


def _feature_spec(features: dict[str, Any], name: Any, key: str) -> dict[str, Any]:
    """data.features[name] as {shape, dtype, encoding}, checked."""
    if not isinstance(name, str) or name not in (features or {}):
        known = ", ".join(features or {}) or "none"
        raise TrainerError(f"data.{key}={name!r} is not a key of data.features (they are: {known})")
    entry = dict(features[name] or {})
    shape, dtype, encoding = entry.get("shape"), entry.get("dtype"), entry.get("encoding", "raw")
    ok_shape = isinstance(shape, Sequence) and all(isinstance(s, int) and s >= 1 for s in shape)
    known = set(entry) <= {"shape", "dtype", "encoding"}
    if not (ok_shape and known and dtype in TFRECORD_DTYPES and encoding in ("raw", "image")):
        raise TrainerError(
            f"data.features.{name}={entry} is invalid: expected {{shape: [...], dtype: uint8 | int64 | float32}} "
            "(uint8 optionally with encoding: image)"
        )
    if encoding == "image" and (dtype != "uint8" or len(shape) != 3):
        raise TrainerError(
            f"data.features.{name}: encoding: image needs dtype: uint8 and shape [height, width, channels]"
        )
    return {"shape": list(shape), "dtype": dtype, "encoding": encoding}


def _parse_spec(spec: dict[str, Any]) -> tf.io.FixedLenFeature:
    if spec["dtype"] == "uint8":
        return tf.io.FixedLenFeature([], tf.string)
    return tf.io.FixedLenFeature(spec["shape"], tf.as_dtype(spec["dtype"]))


def _decoded(value: tf.Tensor, spec: dict[str, Any], name: str = "", source: str = "data") -> tf.Tensor:
    if spec["dtype"] != "uint8":
        return value
    if spec["encoding"] == "image":
        image = tf.io.decode_image(value, channels=spec["shape"][-1], expand_animations=False)
        return tf.ensure_shape(image, spec["shape"])
    pixels = tf.io.decode_raw(value, tf.uint8)
    size = int(np.prod(spec["shape"]))
    # Only the first record of a file is checked before training: a later one of another size is named here, in
    # the words reading() (inputs.py) and _stack_records pass on, instead of a traceback about a reshape
    check = tf.debugging.assert_equal(tf.size(pixels), size, message=(
        f"TrainerError: {source}: a record's feature {name!r} has another number of bytes than "
        f"data.features.{name}.shape={spec['shape']} needs ({size}); every record must match the spec"))  # fmt: skip
    with tf.control_dependencies([check]):
        return tf.reshape(pixels, spec["shape"])


def _stack_records(stream: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """`_stack`, with a record that does not match the spec as one line (read_error)."""
    try:
        return _stack(stream)
    except tf.errors.InvalidArgumentError as e:
        error = read_error(e)
        if error is None:
            raise
        raise error from None


PARSE_ERROR = r"Key: (\w+), Index: \d+\.\s+([^\n\[]+)"  # tf.io.parse_example: a record unlike the spec
IMAGE_DECODE_ERROR = r"(Invalid \w+ data[^\n]*|Unknown image file format[^\n]*|jpeg::Uncompress failed[^\n]*)"


def read_error(error: tf.errors.OpError) -> TrainerError | None:
    """The one line for an op error a stream raised while reading, None for any other: a source's TrainerError
    (raised in a generator, or the message of an assert in a map), a TFRecord record unlike the spec, an image
    that does not decode (image_folder reads headers only; the stream cannot say which file, held in memory the
    reader names it)."""
    text = error.message or ""
    found = re.search(r"TrainerError: ([^\n]+)", text)
    if found is not None:
        return TrainerError(found.group(1).split("] [Condition")[0].replace("\\'", "'").strip())
    found = re.search(PARSE_ERROR, text)
    if found is not None:
        name, reason = found.group(1), " ".join(found.group(2).split()).split(" but output shape")[0]
        return TrainerError(
            f"data.path: a record's feature {name!r} does not match data.features.{name} ({reason}); every record "
            "must match the spec"
        )
    found = re.search(IMAGE_DECODE_ERROR, text)
    if found is not None:
        return TrainerError(
            f"an image of data.path cannot be decoded ({found.group(1).strip()}): a damaged file; run once with "
            "data.in_memory=true to have it named, then remove or replace it"
        )
    return None


def _record_files(path: Any, source: str) -> list[str]:
    patterns = [path] if isinstance(path, str) else list(path)
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(str(pattern), recursive=True))
        if not found:
            raise TrainerError(f"{source}: no file matches {pattern!r} (working directory: {Path.cwd()})")
        if Path(found[0]).is_dir():
            raise TrainerError(f"{source}: {found[0]} is a directory; name the files, e.g. '{found[0]}/*.tfrecord'")
        files += regular_files(found, source)
    return files


def _compression(file: str, compression: str) -> str:
    """The compression_type TFRecordDataset needs: auto reads the file's start (gzip) and its extension (zlib)."""
    if compression != "auto":
        return "" if compression == "none" else compression
    with open(file, "rb") as f:
        if f.read(2) == GZIP_MAGIC:
            return "GZIP"
    return "ZLIB" if file.lower().endswith(ZLIB_SUFFIXES) else ""


def _check_first_record(file: str, compression: str, spec: dict[str, dict], source: str) -> None:
    """The file's first record against the spec, in Python: a mismatch is one line naming the feature."""
    try:
        first = next(iter(tf.data.TFRecordDataset(file, compression).take(1)), None)
    except tf.errors.OpError as e:
        raise _unreadable(file, compression, source, e) from None
    if first is None:
        return
    try:
        record = tf.train.Example.FromString(first.numpy())
    except Exception:  # a protobuf DecodeError: the bytes are no tf.train.Example
        raise TrainerError(f"{source}: the records of {file} are not tf.train.Example protos") from None
    present = record.features.feature
    for name, s in spec.items():
        where = f"{source}: feature {name!r} of the first record of {file}"
        if name not in present:
            raise TrainerError(
                f"{source}: the records of {file} have no feature {name!r} (they have: {', '.join(sorted(present))}); "
                "fix data.features, data.inputs or data.target"
            )
        kind, wanted = present[name].WhichOneof("kind"), TFRECORD_DTYPES[s["dtype"]]
        if kind != wanted:
            other = {v: k for k, v in TFRECORD_DTYPES.items()}.get(kind, "?")
            raise TrainerError(
                f"{where} is a {kind}, but data.features.{name}.dtype={s['dtype']} reads a {wanted}; set dtype: {other}"
            )
        values = getattr(present[name], kind).value
        size = int(np.prod(s["shape"]))
        if s["dtype"] != "uint8" and len(values) != size:
            raise TrainerError(
                f"{where} has {len(values)} values; data.features.{name}.shape={s['shape']} needs {size}"
            )
        if s["dtype"] == "uint8" and len(values) != 1:
            raise TrainerError(f"{where} holds {len(values)} byte strings; dtype uint8 reads one (the pixels)")
        if s["dtype"] == "uint8" and s["encoding"] == "raw" and len(values[0]) != size:
            raise TrainerError(
                f"{where} has {len(values[0])} bytes; data.features.{name}.shape={s['shape']} needs {size} "
                "(if they are a PNG or JPEG file, set encoding: image)"
            )
        if s["encoding"] == "image":
            try:
                shape = tuple(tf.io.decode_image(values[0], channels=s["shape"][-1], expand_animations=False).shape)
            except tf.errors.InvalidArgumentError:
                raise TrainerError(f"{where} is not an image TensorFlow can decode") from None
            if list(shape) != s["shape"]:
                raise TrainerError(
                    f"{where} is an image of shape {list(shape)}; data.features.{name}.shape={s['shape']}"
                )


def _count_records(files: list[str], codes: list[str], source: str) -> int:
    """The number of records: one pass in TensorFlow over the raw records (no parsing)."""
    total = 0
    for f, code in zip(files, codes, strict=True):
        try:
            total += int(tf.data.TFRecordDataset(f, code).reduce(np.int64(0), lambda n, _: n + 1))
        except tf.errors.OpError as e:
            raise _unreadable(f, code, source, e) from None
    return total


def _unreadable(file: str, compression: str, source: str, error: Exception) -> TrainerError:
    hint = f"data.compression={compression or 'none'} is wrong, or " if compression else ""
    reason = str(getattr(error, "message", error)).splitlines()[0]
    return TrainerError(
        f"{source}: {file} cannot be read as TFRecord ({reason}); {hint}the file is damaged or no TFRecord file "
        f"(compressed files: set data.compression={' | '.join(TFRECORD_COMPRESSION[2:])})"
    )


# --- a folder of images per class ------------------------------------------------------------------------
def image_folder(
    path: str, image_size: Sequence[int] | None, color_mode: str, rescale: float | None, augment: dict | None
) -> Examples:
    """Images in a subfolder per class, as keras.utils.image_dataset_from_directory reads them.

    Classes are the subfolder names, sorted; example order is class by class, files sorted within each (Keras'
    order before its shuffle). x is uint8 [height, width, channels]: `rescale` is applied inside the model, and
    `augment` by the training split's preprocessing (augmentation_layers). Every image's header is opened
    before training (PIL reads only the header): an unreadable file is named, and without image_size every
    image must have the same size. With image_size, images are resized (bilinear, as Keras) and rounded back
    to uint8.
    """
    from PIL import Image

    source = f"data.path={path!r}"
    classes, files, labels = _class_files(Path(path), source)
    sizes = {}
    for f in files:
        try:
            with Image.open(f) as image:
                sizes[f], kind = image.size, image.format  # (width, height)
        except OSError as e:
            raise TrainerError(f"{source}: {f} is not an image that can be read ({e}); remove or replace it") from None
        if kind not in TF_IMAGE_FORMATS:
            raise TrainerError(f"{source}: {f} is a {kind} image, which TensorFlow cannot decode; convert it to "
                               f"{', '.join(TF_IMAGE_FORMATS)}, or remove it")  # fmt: skip
    if image_size is None:
        first = files[0]
        other = next((f for f in files if sizes[f] != sizes[first]), None)
        if other is not None:
            (w1, h1), (w2, h2) = sizes[first], sizes[other]
            raise TrainerError(
                f"{source}: images differ in size ({first} is {h1}x{w1}, {other} is {h2}x{w2}, height x width); set "
                "data.image_size=[height, width] to resize them all"
            )
        height_width = [sizes[first][1], sizes[first][0]]
    else:
        height_width = [int(s) for s in image_size]
    shape = (*height_width, COLOR_MODES[color_mode])
    check_augment(augment)

    def decode(file: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(tf.io.read_file(file), channels=shape[-1], expand_animations=False)
        if image_size is not None:
            image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, height_width)), 0, 255), tf.uint8)
        return tf.ensure_shape(image, shape), label

    def read() -> tf.data.Dataset:
        pairs = tf.data.Dataset.from_tensor_slices((files, np.asarray(labels, np.int64)))
        return pairs.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def undecodable() -> TrainerError | None:
        """The first file TensorFlow cannot decode, named: held data finds it here, and so does a stream that
        failed (its error says only that some image did not decode). Decodes until it finds one: after an error."""
        bad = next((f for f in files if not _decodes(f, shape[-1])), None)
        return TrainerError(f"{source}: {bad} cannot be decoded as an image; remove or replace it") if bad else None

    def arrays() -> tuple[np.ndarray, np.ndarray]:
        try:
            return _stack(read(), batch=1024)
        except tf.errors.InvalidArgumentError as e:
            raise (undecodable() or e) from None

    return Examples(
        count=len(files),
        x_shape=shape,
        y_shape=(),
        x_dtype="uint8",
        y_dtype="int64",
        arrays=arrays,
        read=read,
        source=source,
        labels=classes,
        task="multiclass",
        numeric=False,
        rescale=rescale,
        augment=dict(augment) if augment else None,
        diagnose=undecodable,
    )


def _class_files(root: Path, source: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, image files, their class ids): class by class, each class's files in sorted path order."""
    if not root.exists():
        raise TrainerError(f"{source}: no such folder (working directory: {Path.cwd()})")
    if not root.is_dir():
        raise TrainerError(f"{source} is a file; expected a folder with a subfolder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = sum(1 for f in root.iterdir() if f.suffix.lower() in IMAGE_FORMATS)
        if loose:
            raise TrainerError(
                f"{source} has {loose} images at its top level but no class subfolders; put each class's images "
                f"in a subfolder named after the class ({root}/cat/1.png, {root}/dog/2.png)"
            )
        raise TrainerError(f"{source} is empty; expected a subfolder of images per class")
    files, labels = [], []
    for label, name in enumerate(classes):
        for folder, _, names in sorted(os.walk(root / name), key=lambda w: w[0]):
            found = [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_FORMATS)]
            files += regular_files(found, source)
            labels += [label] * len(found)
    if not files:
        raise TrainerError(
            f"{source}: its class subfolders ({', '.join(classes[:5])}) hold no images ({' '.join(IMAGE_FORMATS)})"
        )
    return classes, files, labels


def _decodes(file: str, channels: int) -> bool:
    try:
        tf.io.decode_image(tf.io.read_file(file), channels=channels, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return False
    return True


def augmentation_layers(
    augment: dict[str, Any] | None, image_shape: Sequence[int], seed: int | None = None
) -> list[keras.layers.Layer]:
    """data.augment as Keras preprocessing layers, to call with training=True on training batches only (not
    in the logged model: RandomCrop center-crops when training=False). `crop: [h, w]` takes a random h x w
    window and resizes it back to the image's own size, so training and validation images keep one shape.
    Order: crop, flip, rotation, zoom. `seed` makes the random draws repeatable.
    """
    check_augment(augment)
    augment = dict(augment or {})
    height, width = int(image_shape[0]), int(image_shape[1])
    layers: list[keras.layers.Layer] = []
    if "crop" in augment:
        h, w = (int(v) for v in augment["crop"])
        if h > height or w > width:
            raise TrainerError(f"data.augment.crop={[h, w]} is larger than the images ({height}x{width})")
        layers += [keras.layers.RandomCrop(h, w, seed=seed), keras.layers.Resizing(height, width)]
    if "flip" in augment:
        layers.append(keras.layers.RandomFlip(augment["flip"], seed=seed))
    if "rotation" in augment:
        layers.append(keras.layers.RandomRotation(augment["rotation"], seed=seed))
    if "zoom" in augment:
        layers.append(keras.layers.RandomZoom(augment["zoom"], seed=seed))
    return layers
