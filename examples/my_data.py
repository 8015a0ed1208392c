"""A user's own data, plugged in by `_target_` (README: "Your own data").

The contract: the function gets the keys of its data option that it names (so it may take `seed`, but need
not), and returns one of
  - a `tf.data.Dataset` of unbatched (x, y) pairs (the trainer batches, shuffles and splits it),
  - a pair (train, val) of such datasets,
  - arrays (x, y), or ((x, y), (x_val, y_val)),
  - `trainer.data.Examples` (what the built-in readers return).
Anything else is one line naming the function. The shared settings (val_fraction, normalize, in_memory,
shuffle, ...) apply to what it returns, as to the built-in sources.
"""

import numpy as np
import tensorflow as tf


def wine_records(path: str | None = None, seed: int = 0) -> tf.data.Dataset:
    """scikit-learn's wine table (178 wines, 13 measurements, 3 cultivars) as a stream of (x, y) examples.

    `path`: a CSV of the same columns (first row a header, class id last); None: scikit-learn's copy.
    """
    if path is None:
        from sklearn.datasets import load_wine

        d = load_wine()
        x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    else:
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        x, y = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
    return tf.data.Dataset.from_tensor_slices((x, y))
