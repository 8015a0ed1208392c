"""One training run as one straight sequence: check, build, restore, fit, save, report, return the objective."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import yaml
from omegaconf import DictConfig, OmegaConf

from trainer import checkpoint, finetune, lifecycle, losses
from trainer.actions import build_callbacks
from trainer.callbacks import Callback
from trainer.checkpoint import Checkpoints, NoCheckpoint
from trainer.cli import notice_console
from trainer.config import (
    ACCEPT_KEY,
    OPTIONAL_GROUPS,
    TRUST_KEY,
    TrainerError,
    build,
    check,
    first_line,
    named_targets,
    trusted_config,
    with_current_defaults,
)
from trainer.data import Dataset
from trainer.data.prepare import load as load_data
from trainer.data.prepare import preprocessing_layers
from trainer.data.scaling import scaled_loss, unscale_layer
from trainer.data.weights import require_sample_weight, weighted_loss
from trainer.fit import Result, fit
from trainer.inputs import ArrayInput, StreamInput, read_error
from trainer.loop import StepLoop
from trainer.models import Embedded, check_fits, portable
from trainer.optim import Schedule, build_optimizer
from trainer.process import STOP_GRACE_SECONDS, process_settings
from trainer.profile import check_profile
from trainer.secrets import redact
from trainer.steps import Step, Supervised
from trainer.tracking import QuietRun, Run, stored_through
from trainer.tracking.lineage import log_data

console = notice_console()


def train(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    tags: dict[str, str] | None = None,
    callbacks: Sequence[Callback] = (),
    schedule: Schedule | None = None,
) -> float:
    """Train as `cfg` says and return the objective a sweeper minimises (final validation loss).

    `callbacks`: objects of your own, run after those of `trainer.callbacks` (actions.Callback).
    `schedule`: the learning rate's, in place of optimizer.lr and cfg.schedule (the LR finder's ramp).
    lr_find=true runs only the LR range test and returns its suggestion; optimizer.lr=auto runs it first."""
    resume = checkpoint.find(cfg.resume, cfg.tracking.uri) if cfg.get("resume") else None
    accept_changed = bool(cfg.get(ACCEPT_KEY))  # the user's own say, never the run's (a resume's own config)
    if resume:
        cfg = _resumed_config(resume, overrides, cfg)
    check(cfg)
    auto = (cfg.get("optimizer") or {}).get("lr") == "auto"
    if cfg.get("lr_find") or auto:  # the range test: its own run (trainer/lr_find.py)
        from trainer import lr_find

        if cfg.get("lr_find"):
            return lr_find.run(cfg, overrides, Path(output_dir or "."), tags)
        cfg, tags = lr_find.resolve_auto(cfg, overrides, Path(output_dir or "."), tags)
    t = cfg.trainer
    callbacks = [*build_callbacks(t.get("callbacks") or ()), *callbacks]  # a bad one fails before TensorFlow starts
    strategy = _strategy(t)  # first: multi-worker and logical devices must precede any other TF work
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.backend.clear_session()  # fresh layer-name counters: the same names in every run of a sweep
    keras.utils.set_random_seed(t.seed)
    data: Dataset = load_data(cfg.data)
    data_changed = _data_changed(resume, cfg.data, data, accept_changed) if resume else False
    total_steps = _total_steps(t, data)
    check_profile(t.get("profile"), total_steps)
    output_dir = Path(output_dir or ".")
    with process_settings(t.precision) as stop, _device(t.device):  # process-wide state, restored on exit
        model, loop, optimizer = _build(cfg, data, strategy, total_steps, schedule)
        initialized = _init_from(cfg, model) if t.get("init_from") and not resume else None
        _check_unfreeze(cfg, loop, total_steps)
        chief = _is_chief(strategy)
        checkpoints = _checkpoints(t, model, optimizer, loop, resume, output_dir, strategy, chief)
        checkpoints.claim()  # one process per run: a second resume of it is refused here
        if resume:
            _remove_stale_cache_locks(cfg.data)  # the run's own, and this process now holds the run
        second_phase = partial(_second_phase, cfg, loop, checkpoints, total_steps)
        unfreeze = _unfreeze(t)
        try:
            if resume and unfreeze and (checkpoints.newest_candidate() or 0) >= unfreeze.at_step:
                second_phase()  # the checkpoint holds the second phase's layout: built before it is read
            start = _restore(checkpoints, resume, cfg, chief, total_steps) if resume else 0
            tags = {"checkpoint_dir": str(checkpoints.directory), **(tags or {})}
            run_id = resume.run_id if resume else None
            home = checkpoints.directory.parent  # the run's directory, a resumed run's too
            with Run(cfg, overrides, tags=tags, run_id=run_id, directory=home) if chief else QuietRun() as run:
                run.sink.on_durable = checkpoints.mark_durable if chief else None
                stop.on_overdue = partial(_stopped_overdue, run, checkpoints)
                if resume:
                    checkpoints.rewind(start)  # first: a kill from here on resumes from `start` again
                    run.resume_at(start, finished=start >= total_steps)
                    if data_changed and chief:  # accepted: the data it trains on from here, as a dataset input
                        log_data(run, cfg.data, data)
                        run.set_tag("data_changed_at_step", str(start))
                else:
                    if chief:
                        checkpoints.write_run_file(run.run_id, run.uri, cfg)
                        log_data(run, cfg.data, data)  # dataset inputs: which files, which split (tracking/lineage)
                        if initialized:
                            run.set_tag("init_from", initialized)
                    checkpoints.save(0)  # a base to resume from, even for a run killed before its first save
                if t.print_gradients and start == 0:
                    _report_gradients(loop, run)
                phases = [finetune.Unfreeze(unfreeze.at_step, second_phase, start)] if unfreeze else []
                result = fit(loop, data, run, t, total_steps, checkpoints, start, [*phases, *callbacks], stop)
                if chief:
                    _log_data_facts(data, run)
                if cfg.tracking.log_model and chief:  # retried whole while the store is locked
                    lifecycle.retry_busy(_log_model, loop, run, output_dir, data, cfg)
                _summarize(result, run)
        finally:
            checkpoints.release()
    return result.objective


def _stopped_overdue(run: Run | QuietRun, checkpoints: Checkpoints, signum: int) -> None:
    """A signal's round did not end in time (process.StopFlag): say so, and mark the run KILLED, before the exit.
    What a resume starts from is the newest durable checkpoint, as after kill -9."""
    import signal as signals

    durable, name = checkpoints.durable_step(), signals.Signals(signum).name
    print(f"stopped: {name} and the round did not end within {STOP_GRACE_SECONDS:g} s (a long compiled call, "
          f"evaluation or checkpoint); stopped at once. The newest durable checkpoint is at step {durable}; continue "
          f"with: python -m trainer resume={checkpoints.directory.parent}", file=sys.stderr, flush=True)  # fmt: skip
    if isinstance(run, Run):
        run.client.set_tag(run.run_id, "stopped_by", f"{name}, after {STOP_GRACE_SECONDS:g} s without a round's end")
        run.client.set_terminated(run.run_id, "KILLED")


def _build(cfg: DictConfig, data: Dataset, strategy: tf.distribute.Strategy, total_steps: int,
           schedule: Schedule | None = None):  # fmt: skip
    """The step and what it takes of the model, loss and optimizer groups, under the strategy's scope (their
    variables are mirrored), then the loop around it."""
    t = cfg.trainer
    takes = _step_takes(cfg)
    with strategy.scope():
        parts = {}
        if "model" in takes:
            parts["model"] = build(cfg.model, **_from_data(cfg.model, data))
            embedded = data.schema.embedded if data.schema is not None else []
            sizes = [n for _, n in embedded]
            # a layer list that does not fit the data: the layer named (behind embedded columns: their vectors)
            check_fits(parts["model"], (Embedded.inner_width(data.n_features, sizes),) if sizes else data.x_shape)
            if sizes:
                parts["model"] = Embedded(parts["model"], [p for p, _ in embedded], sizes, data.n_features)
        if "loss" in takes:
            parts["loss"] = build(cfg.loss)
            _check_loss_fits_data(cfg, parts["loss"], data)
            if data.sample_weight is not None:
                require_sample_weight(parts["loss"], "data.sample_weight", cfg.loss.get("_target_", "?"))
            if data.class_weight is not None:
                parts["loss"] = weighted_loss(parts["loss"], data.class_weight, data, cfg.loss.get("_target_", "?"))
            if data.target_scale is not None:
                parts["loss"] = scaled_loss(parts["loss"], data.target_scale)
        if "optimizer" in takes:
            parts["optimizer"] = build_optimizer(cfg.optimizer, cfg.schedule, total_steps, schedule)
        step = build(cfg.step, **parts)
        if not isinstance(step, Step):
            raise TrainerError(f"step._target_={cfg.step._target_!r} is a {type(step).__name__}, not a "
                               "trainer.steps.Step: subclass it (README: Your own step)")  # fmt: skip
        if data.sample_weight is not None and not step.weighted:
            raise TrainerError(f"data.sample_weight: step {cfg.step._target_} does not take (x, y, sample_weight) "
                               "batches (Step.weighted is False); weight its loss itself, or drop the "
                               "setting")  # fmt: skip
        if t.precision == "mixed_float16":  # every optimizer of the step scales its loss
            for name in step.trains:
                setattr(step, name, keras.optimizers.LossScaleOptimizer(getattr(step, name)))
    loop = _build_loop(cfg, step, data, strategy)
    if type(step) is not Supervised:  # the user's code (or a built-in's): traced once on its own first
        loop.check_step()
    return loop.model, loop, loop.optimizer


def _init_from(cfg: DictConfig, model: Any) -> str:
    """trainer.init_from: the other run's weights in this run's model, before its first step (finetune.py)."""
    if cfg.get("model") is None:
        raise TrainerError(f"trainer.init_from: step {cfg.step._target_} builds its own models; init_from loads the "
                           "weights of model=... only")  # fmt: skip
    return finetune.init_from(model, str(cfg.trainer.init_from), cfg.tracking.uri)


def _check_unfreeze(cfg: DictConfig, loop: StepLoop, total_steps: int) -> None:
    """trainer.unfreeze that could never happen, or that has nothing to unfreeze, is one line before training."""
    u = _unfreeze(cfg.trainer)
    if u is None:
        return
    if not loop.supervised:
        raise TrainerError(f"trainer.unfreeze: step {cfg.step._target_} is not the supervised step; its own models' "
                           "phases are its own to write (README: Your own step)")  # fmt: skip
    if u.at_step >= total_steps:
        raise TrainerError(f"trainer.unfreeze.at_step={u.at_step} is not before the run's end (step {total_steps}): "
                           "it would never happen; set it lower, or trainer.max_steps higher")  # fmt: skip
    if u.layers is None and not getattr(loop.model, "freeze", None):
        finetune.unfreeze(loop.model, None)  # raises: nothing was frozen


def _unfreeze(t: DictConfig) -> DictConfig | None:
    """trainer.unfreeze when it asks for a second phase (at_step set); None for one phase (or a run's config
    written before the key)."""
    u = t.get("unfreeze")
    return u if u is not None and u.get("at_step") is not None else None


def _second_phase(cfg: DictConfig, loop: StepLoop, checkpoints: Checkpoints, total_steps: int) -> None:
    """trainer.unfreeze: the layers trainable, a new optimizer (optimizer.lr times lr_multiplier, the schedule
    going on from at_step, fresh moments, as Keras' transfer-learning guide recompiles), the loop retraced."""
    u = cfg.trainer.unfreeze
    finetune.unfreeze(loop.step_impl.model, None if u.layers is None else list(u.layers))
    node = cfg.optimizer.copy()
    node.lr = float(node.lr) * u.lr_multiplier
    with loop.strategy.scope():
        optimizer = build_optimizer(node, cfg.schedule, total_steps)
        if cfg.trainer.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.iterations.assign(u.at_step)
    loop.retrain({"optimizer": optimizer})
    checkpoints.retrack(**loop.checkpointed())


def _step_takes(cfg: DictConfig) -> set[str]:
    """Which of the model, loss and optimizer groups the step's constructor takes; a group it takes must be set,
    and one it does not take must be null (a setting nothing reads would look like it had done something)."""
    import inspect

    from hydra.utils import get_class

    target = cfg.step._target_
    try:
        params = inspect.signature(get_class(target)).parameters
    except Exception as e:
        raise TrainerError(f"step._target_={target!r} cannot be imported: {first_line(e)}") from None
    takes = {group for group in OPTIONAL_GROUPS if group in params}
    for group in OPTIONAL_GROUPS:
        if group in takes and cfg.get(group) is None:
            raise TrainerError(f"step {target} takes a {group}: set {group}=... (e.g. {_EXAMPLE[group]})")
        if group not in takes and cfg.get(group) is not None:
            used = cfg[group].get("_target_", "...")
            raise TrainerError(f"step {target} takes no {group} (it builds its own or needs none): {group}={used} "
                               f"would not be used; leave it out with ~{group}")  # fmt: skip
    return takes


_EXAMPLE = {"model": "model=mlp", "loss": "loss=mse", "optimizer": "optimizer=adam"}


def _checkpoints(t: DictConfig, model, optimizer, loop: StepLoop, resume: checkpoint.Resume | None,
                 output_dir: Path, strategy: tf.distribute.Strategy, chief: bool) -> Checkpoints:  # fmt: skip
    """Everything a resumed run needs; under multi-worker every worker saves, each into its own directory."""
    directory = resume.directory if resume else (output_dir / "checkpoints").resolve()
    durable = directory / checkpoint.DURABLE_FILE  # the chief's sink knows what the store holds; workers read it
    if not chief:
        directory = directory.with_name(f"checkpoints-worker{strategy.cluster_resolver.task_id}")
    return Checkpoints(directory, t.max_to_keep, durable, step=loop.step, skipped=loop.skipped,
                       **loop.checkpointed(), **loop.input.state())  # fmt: skip


def _restore(checkpoints: Checkpoints, resume: checkpoint.Resume, cfg: DictConfig, chief: bool, total: int) -> int:
    """The newest checkpoint the store's history covers (held to what the store shows, for SQL stores); a
    run with none is closed (FAILED) and says so; one already past the run's length is an error."""
    if chief:
        checkpoints.limit_durable(stored_through(resume.tracking_uri, resume.run_id, cfg.tracking.log_every))
    try:
        start = checkpoints.restore_latest()
    except NoCheckpoint as e:
        closed = lifecycle.close_if_dead(resume.tracking_uri, resume.run_id)
        raise TrainerError(f"{e}; {closed}; start it again as a new run") from e
    if start > total:
        raise TrainerError(f"resume: the run's checkpoint is at step {start}, past the {total} steps asked for; "
                           f"set trainer.max_steps above {start} (or more trainer.epochs) to train on")  # fmt: skip
    return start


def _remove_stale_cache_locks(node: DictConfig) -> None:
    """tf.data's cache writes `<prefix>*.lockfile` while it fills a file cache; a run killed meanwhile leaves it, and
    the resume failed on it once (the next one worked). The resume holds the run's lock (checkpoint.claim), so
    the run's own cache lock is stale."""
    import glob

    cache = node.get("cache")
    if cache and cache != "memory":
        for lock in glob.glob(f"{glob.escape(str(cache))}*.lockfile"):
            Path(lock).unlink(missing_ok=True)


def _check_written_paths(cfg: DictConfig, own: DictConfig, resume: checkpoint.Resume) -> None:
    """A resumed config writes only where the run itself does, or where the user's own config says: its tf.data
    cache file (data.cache) lies under the run's directory or is the user's own value. A tampered run.json's
    `data.cache=<elsewhere>` wrote 9.6 MB outside it."""
    cache = cfg.data.get("cache")
    if cache in (None, "memory") or cache == (own.get("data") or {}).get("cache"):
        return
    home = resume.directory.parent.resolve()
    if not Path(cache).resolve().is_relative_to(home):
        where = resume.directory / checkpoint.RUN_FILE
        raise TrainerError(f"resume: {where}: data.cache={cache} is outside the run's directory {home}; a resume "
                           "writes only there, or where your own data.cache=... says")  # fmt: skip


def _data_changed(resume: checkpoint.Resume, node: DictConfig, data: Dataset, accept: bool) -> bool:
    """Whether a resumed run's data differs from what it trained on: its training split's digest (files' size,
    mtime and ends, and the settings that pick the split; tracking/lineage.py) against those logged on the run.
    Different: refused unless `accept` (the run then logs the new data as a dataset input). A streamed x.npy
    replaced by x*2 between a kill and the resume trained on silently, the store still showing the old digest."""
    import mlflow

    from trainer.tracking.lineage import data_inputs

    now = next(d.dataset.digest for d in data_inputs(node, data) if _context(d) == "training")
    run = mlflow.MlflowClient(resume.tracking_uri).get_run(resume.run_id)
    logged = [d.dataset.digest for d in (run.inputs.dataset_inputs if run.inputs else []) if _context(d) == "training"]
    if not logged or now in logged:  # a run from before dataset inputs has nothing to compare with
        return False
    if accept:
        console.print(
            f"[yellow]resume: the data differs from what run {resume.run_id} trained on (digest {now}, "
            f"was {logged[-1]}); training on with it ({ACCEPT_KEY}=true), logged as a new dataset input"
        )
        return True
    raise TrainerError(
        f"resume: the data is not what run {resume.run_id} trained on (training split digest {now} now, "
        f"{', '.join(logged)} logged: data.path's files or the data settings changed); put the data back, or resume "
        f"with {ACCEPT_KEY}=true to train on with it (logged on the run as a new dataset input)"
    )


def _context(dataset_input) -> str:
    return next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), "")


def _resumed_config(resume: checkpoint.Resume, overrides: Sequence[str], own: DictConfig) -> DictConfig:
    """The run's own config, so the resumed run is the same run; only its length may be changed.

    The run directory is data that anyone who can write there may have edited: its config may build only
    the targets the user's own config (`own`: its options, overrides and `trusted_targets`) would, and
    `trusted_targets` comes from the command line, never from the run (see config.trusted_config)."""
    ignored = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("trainer.max_steps", "trainer.epochs"):
            OmegaConf.update(resume.config, key, yaml.safe_load(value))
        elif key not in ("resume", TRUST_KEY, ACCEPT_KEY, "data.cache", "tracking.uri"):  # read: see below
            ignored.append(override)
    if ignored:
        console.print(f"[yellow]resume: the run's own config is used; ignoring {redact(' '.join(ignored))}")
    for unused in ("launcher", "hparams_search", "experiment"):  # how it was launched: a resume does not use them
        resume.config.pop(unused, None)
    stored = with_current_defaults(resume.config)  # keys its run.json predates
    cfg = trusted_config(stored, named_targets(own), f"resume: {resume.directory / checkpoint.RUN_FILE}")
    OmegaConf.update(cfg, "tracking.uri", resume.tracking_uri, merge=True)
    _check_written_paths(cfg, own, resume)
    cfg[TRUST_KEY] = list(own.get(TRUST_KEY) or ())
    cfg[ACCEPT_KEY] = bool(own.get(ACCEPT_KEY))
    return cfg


def _total_steps(t: DictConfig, data: Dataset) -> int:
    n = data.n_train
    if t.batch_size > n:
        raise TrainerError(f"trainer.batch_size={t.batch_size} is larger than the training set ({n} examples): "
                           f"set trainer.batch_size={min(n, 32)} or lower")  # fmt: skip
    if t.epochs:
        return max(t.epochs * (n // t.batch_size) // t.accumulate_steps, 1)
    return t.max_steps


def _device(name: str):
    if name == "auto":
        return nullcontext()
    kind = {"cpu": "CPU", "gpu": "GPU"}.get(name)
    if kind and not tf.config.list_logical_devices(kind):
        raise TrainerError(f"trainer.device={name!r}: TensorFlow sees no {kind}; use auto or cpu")
    return tf.device(f"/{kind}:0" if kind else name)


def _strategy(t: DictConfig) -> tf.distribute.Strategy:
    """tf.distribute's engine, not ours: auto means MirroredStrategy when several GPUs are visible."""
    _threads(t)
    if t.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        wanted = [tf.config.LogicalDeviceConfiguration()] * t.logical_cpus
        if tf.config.get_logical_device_configuration(cpu) != wanted:
            try:
                tf.config.set_logical_device_configuration(cpu, wanted)
            except RuntimeError as e:
                raise TrainerError(f"trainer.logical_cpus={t.logical_cpus}: TensorFlow already started ({e})") from e
    if t.strategy == "multi_worker":  # TF_CONFIG or SLURM; must come before anything starts TensorFlow
        from trainer import cluster

        return cluster.strategy(t)
    gpus = tf.config.list_logical_devices("GPU")
    if t.strategy == "mirrored" or (t.strategy == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def _threads(t: DictConfig) -> None:
    """Thread pools are fixed when TensorFlow starts: set them first, or say that it is too late."""
    threading = tf.config.threading
    pools = {
        "intra_op_threads": (threading.get_intra_op_parallelism_threads, threading.set_intra_op_parallelism_threads),
        "inter_op_threads": (threading.get_inter_op_parallelism_threads, threading.set_inter_op_parallelism_threads),
    }
    for key, (get, set_) in pools.items():
        wanted = t.get(key)
        if wanted is None or get() == wanted:
            continue
        try:
            set_(wanted)
        except RuntimeError as e:
            raise TrainerError(f"trainer.{key}={wanted}: TensorFlow already started with another value ({e})") from e


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Multi-worker: the chief (or worker 0 when there is no chief task) logs; the others only train."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())  # fmt: skip


def _build_loop(cfg: DictConfig, step: Step, data: Dataset, strategy: tf.distribute.Strategy | None = None) -> StepLoop:
    t, d = cfg.trainer, cfg.data
    if data.streamed:  # the distributed and accumulation rules are the loop's (StepLoop.__init__)
        inputs = StreamInput(data.train, t.batch_size, t.seed, d.get("shuffle", True), d.get("shuffle_buffer", 10000),
                             d.get("cache"), data.preprocess, strategy)  # fmt: skip
    else:
        inputs = ArrayInput(data.x_train, data.y_train, t.batch_size, t.seed, d.get("shuffle", True), data.preprocess,
                            t.accumulate_steps, data.sample_weight)  # fmt: skip
    try:
        loop = StepLoop(
            step, None, None, inputs, None, t.batch_size,
            seed=t.seed, clip_norm=t.clip_norm, grad_norms=cfg.tracking.log_grad_norms,
            on_nonfinite=t.on_nonfinite, accumulate_steps=t.accumulate_steps, jit=t.jit, strategy=strategy,
        )  # fmt: skip
    except (ValueError, tf.errors.InvalidArgumentError) as e:
        if isinstance(e, tf.errors.OpError) and read_error(e) is not None:  # the first batch could not be read
            named = data.train.diagnose() if data.streamed and data.train.diagnose else None
            raise (named or read_error(e)) from None
        model = cfg.get("model") or cfg.step
        raise TrainerError(f"model {model._target_} cannot take inputs of shape {data.x_shape}: "
                           f"{str(e).splitlines()[0]}") from e  # fmt: skip
    loop.output_scale = data.target_scale  # evaluation in the targets' units (data/scaling.py)
    if not isinstance(step, Supervised):  # the data's targets are a supervised step's business
        return loop
    model = step.model
    out_shape = tuple(model(inputs.example(1)).shape[1:])
    wanted = (data.n_outputs,) if data.task == "multiclass" else data.y_shape
    if len(out_shape) > max(len(wanted), 1) and len(data.x_shape) > 1:  # Dense layers kept the image's axes
        raise TrainerError(
            f"model {cfg.model._target_} gives outputs of shape {out_shape} per example: it keeps the axes of examples "
            f"of shape {tuple(data.x_shape)}; use model=cnn for images, or model=sequential starting with a "
            "keras.layers.Flatten"
        )
    if out_shape != tuple(wanted):
        raise TrainerError(
            f"the model gives outputs of shape {out_shape} per example but the data's targets need {tuple(wanted)}"
            f" ({data.task}): set model.units={data.n_outputs}, or model.units=null to take it from the data"
        )
    return loop


def _from_data(node: DictConfig, data: Dataset) -> dict:
    """The model keys left null that the data knows: `units` (outputs: classes, 1 for binary, targets) and
    `input_shape` (one example's shape)."""
    known = {"units": data.n_outputs, "input_shape": list(data.x_shape)}
    return {key: value for key, value in known.items() if key in node and node[key] is None}


def _check_loss_fits_data(cfg: DictConfig, loss_fn, data: Dataset) -> None:
    """The loss against the task the data makes (data/prepare.infer_task), one line naming the fix."""
    fn = getattr(loss_fn, "func", loss_fn)
    name = getattr(fn, "__name__", "")
    sparse = data.task == "multiclass" and not data.one_hot
    if data.task == "regression" and fn in losses.CLASSIFICATION:
        raise TrainerError(
            f"loss {name} needs class targets but data {cfg.data._target_} has continuous ones: "
            "use loss=mse (or squared, mae, huber) for regression"
        )
    fix = {"binary": "loss=binary_crossentropy", "multiclass": "loss=sparse_categorical_crossentropy" if sparse
           else "loss=categorical_crossentropy"}.get(data.task)  # fmt: skip
    if fix and fn in losses.REGRESSION:
        classes = f"{data.n_classes} classes" if data.task == "multiclass" else "0/1 targets"
        raise TrainerError(f"data {cfg.data._target_} is a {data.task} task ({classes}) but loss={name} is a "
                           f"regression loss: use {fix}")  # fmt: skip
    if fn in losses.CLASS_IDS and not sparse:
        raise TrainerError(f"loss={name} needs class ids but data {cfg.data._target_} is a {data.task} task with "
                           f"targets of shape {data.y_shape}: use {fix or 'loss=mse'}")  # fmt: skip
    if sparse and name == "categorical_crossentropy":
        raise TrainerError(f"data {cfg.data._target_} gives class ids, not one-hot rows: use "
                           "loss=sparse_categorical_crossentropy")  # fmt: skip


def _log_data_facts(data: Dataset, run: Run) -> None:
    """What a reader of the run needs to use its model: class names by id, and how the data was held."""
    run.set_tag("data.task", data.task)
    run.set_tag("data.held", "streamed" if data.streamed else "in_memory")
    if data.labels:
        run.log_text(json.dumps({"labels": data.labels}, indent=1), "labels.json")
    if data.schema is not None:  # what was decided of each column, for a user to read (and evaluate to reuse)
        run.log_text(json.dumps(data.schema.to_dict(), indent=1), "table_schema.json")
        run.log_params({f"schema.{kind}": n for kind, n in data.schema.counts().items()})
    if data.class_weight is not None:  # what data.class_weight came to (balanced: from the training split)
        names = data.labels or [str(i) for i in range(len(data.class_weight))]
        weights = {name: float(w) for name, w in zip(names, data.class_weight, strict=True)}
        run.log_text(json.dumps({"class_weights": weights}, indent=1), "class_weights.json")


def _report_gradients(loop: StepLoop, run: Run) -> None:
    """The GradientTape introduction's printout, for the batch the first step will see."""
    grads = {name: g.numpy() for name, g in zip(loop.variable_names, loop.gradients(), strict=True)}
    for name, g in grads.items():
        print(f"Gradients of {name}: {g.item() if g.size == 1 else g}")
    run.log(0, {f"first_step/grad/{n}": g.item() for n, g in grads.items() if g.size == 1})
    run.log_text(json.dumps({n: g.tolist() for n, g in grads.items()}, indent=1), "first_step_gradients.json")


def _log_model(loop: StepLoop, run: Run, output_dir: Path, data: Dataset, cfg: DictConfig) -> None:
    """The model the step exports, twice over: a plain `.keras` file any Keras loads (no `import trainer` needed:
    models.portable), and an MLflow pyfunc model that `mlflow.pyfunc.load_model` loads and `mlflow models serve`
    serves (class probabilities and labels for a classifier; trainer.evaluate reads its `.keras` file),
    registered when tracking.register_model names one.
    With preprocessing (rescale, normalization) the logged model carries it in front, so it takes raw inputs. A
    step whose model does not take the data's inputs (a GAN's generator takes noise) gives its own example."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model, own_example = loop.model, getattr(loop.step_impl, "export_example", None)
    example = own_example() if own_example else _raw_example(data)
    layers = [] if own_example else preprocessing_layers(data.preprocess)
    after = [unscale_layer(loop.output_scale)] if loop.output_scale is not None else []  # the targets' units
    if isinstance(model, keras.Model):  # Keras' own layers only: a bare keras.saving.load_model loads it
        name = "with_preprocessing" if layers or after else None
        model = portable(model, np.shape(example)[1:], str(example.dtype), layers, after, name)
        path = output_dir / "model.keras"
        model.save(path)
    else:
        path = output_dir / "saved_model"
        tf.saved_model.save(model, str(path))
    run.log_artifact(path, "model")
    if isinstance(model, keras.Model):
        from trainer.tracking.models import log_model

        task = data.task if isinstance(loop.step_impl, Supervised) else "regression"  # raw outputs otherwise
        typed = data.schema is not None and not own_example  # raw rows in, through the fitted schema
        log_model(model, "model", input_example=data.raw_example if typed else example, task=task,
                  labels=data.labels if task != "regression" else None,
                  from_logits=bool((cfg.get("loss") or {}).get("from_logits", True)),
                  registered_model_name=cfg.tracking.get("register_model"),
                  table=data.schema.to_dict() if typed else None, targets=_targets_of(cfg.data),
                  inputs=None if own_example else data.feature_names)  # fmt: skip


def _targets_of(node: DictConfig) -> list[str]:
    """A table's target column names: a row sent to the served model may still hold them."""
    target = node.get("target")
    return [target] if isinstance(target, str) else [str(t) for t in target or []]


def _raw_example(data: Dataset) -> np.ndarray:
    """Two raw training inputs: the logged model's input example (its signature)."""
    if not data.streamed:
        return data.x_train[:2]
    x, _ = next(iter(data.train.read().batch(2)))
    return x.numpy()


def _summarize(r: Result, run: Run) -> None:
    val = ", ".join(f"val {k} {v:.6g}" for k, v in r.val.items()) or "no validation split"
    from rich.markup import escape

    board = getattr(run, "tensorboard_dir", None)  # tracking.tensorboard=true: where its event files are
    console.print(
        f"[bold]done[/bold]: {r.steps} steps, final train loss {r.train_loss:.6g}, {val}, "
        f"{r.steps_per_sec:,.0f} steps/s\n"
        + (f"TensorBoard: tensorboard --logdir {escape(str(board))}\n" if board else "")
        + f"MLflow: {escape(run.where)}"
    )


for _name in ("absl", "tensorflow"):  # TF's checkpoint and collective chatter, which Hydra's logging would show
    logging.getLogger(_name).setLevel(logging.WARNING)

if os.environ.get("TRAINER_EAGER") == "1":  # debug the step eagerly, as Keras' run_eagerly does
    tf.config.run_functions_eagerly(True)
