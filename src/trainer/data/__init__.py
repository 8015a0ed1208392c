"""Data sources and what they hand the trainer (see core.py for the contract, prepare.py for the rules).

Each built-in option of conf/data/ names one of the functions exported here by `_target_`.
"""

from trainer.data.core import MAX_ABS_VALUE, Dataset, Examples, Stream, check_values, split, val_mask
from trainer.data.files import image_folder, numpy, tfrecord
from trainer.data.synthetic import classification, oscillator, regression, ring, tape_example
from trainer.data.tables import csv, parquet

__all__ = [
    "MAX_ABS_VALUE",
    "Dataset",
    "Examples",
    "Stream",
    "check_values",
    "classification",
    "csv",
    "image_folder",
    "numpy",
    "oscillator",
    "parquet",
    "regression",
    "ring",
    "split",
    "tape_example",
    "tfrecord",
    "val_mask",
]
