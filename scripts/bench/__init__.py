"""Side-by-side training speed of one job run four ways, in one process, interleaved; and what the store costs.

    python scripts/bench                      # jobs mlp, tape, wide, cnn; 3 repeats; exit 1 if a target is missed
    python scripts/bench --jobs mlp --json bench.json
    python scripts/bench --quick --jobs tape  # a smoke run: tiny step counts, numbers not meaningful
    python scripts/bench --sink --jobs mlp    # the other program: what writing every step's points adds
    python scripts/bench --stream             # a third: ours on files streamed from disk vs Keras fit, RSS
    python scripts/bench --cost tracking.system_metrics=false --jobs mlp  # a fourth: a setting's price
    python scripts/bench --launch --repeats 3  # a fifth: a whole 1-step run against `import tensorflow`

Every competitor gets the same model (built from the job's config with the trainer's seed), data, batch order
(`trainer.loop.epoch_order`, the trainer's own per-epoch shuffle), loss and optimizer:
  naive      the hand-written eager GradientTape loop; `mlflow.log_metric` for loss and grad norm every step
  keras-fit  `model.compile(...)` + `model.fit(...)`, no callbacks, verbose=0, each steps_per_execution
  bare       a tf.function running K steps per call, no metrics at all: the limit for our loop
  ours       `trainer.train.train(cfg)` on a Hydra-composed config, every step logged to a SQLite store
and a fresh `python -m trainer` (launch to step 0) is raced against a fresh `import tensorflow`; --launch races
a whole 1-step run as a user types it (the end-of-run plot drawn) against it, launch to exit.

Modules: harness (jobs, processes, timing, medians, stores), competitors (the four loops), startup (the fresh
processes, and the --launch program), race (one job: sweep, final race, summary), sink (the --sink program),
stream (the --stream program), cost (the --cost program), report (tables, targets, the exit status), __main__
(the command line).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # MLflow's git probe, silent in a temp dir
