"""tape-trainer: config-driven tf.GradientTape training with every step in MLflow."""

import os

__version__ = "0.1.0"

# MLflow 3's usage telemetry starts a thread that sets and unsets `_MLFLOW_TELEMETRY_SESSION_ID` in os.environ
# while requests iterates os.environ for proxies: one resume's first store call failed with KeyError
# '_MLFLOW_TELEMETRY_SESSION_ID' (the slow credentials test, once in 85 tests). Off unless you set it yourself.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
