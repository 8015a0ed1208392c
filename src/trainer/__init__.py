"""tape-trainer: config-driven tf.GradientTape training with every step in MLflow."""

__version__ = "0.1.0"
