"""One training run as one straight sequence: check, build, fit, save, report, return the objective."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainer import losses
from trainer.config import TrainerError, build, check
from trainer.data import Dataset
from trainer.loop import StepLoop
from trainer.optim import build_optimizer
from trainer.tracking import Chunk, Run

console = Console(stderr=True)

CHUNK_SECONDS = 0.2  # auto steps_per_loop aims at chunks this long: responsive progress, negligible overhead
MAX_STEPS_PER_LOOP = 1000


@dataclass
class Result:
    steps: int
    train_loss: float
    val: dict[str, float]
    steps_per_sec: float
    objective: float


def train(cfg: DictConfig, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> float:
    """Train as `cfg` says and return the objective a sweeper minimises (final validation loss)."""
    check(cfg)
    t = cfg.trainer
    keras.utils.set_random_seed(t.seed)
    data: Dataset = build(cfg.data)
    total_steps = _total_steps(t, data)
    with _device(t.device):
        model = build(cfg.model)
        loss_fn = build(cfg.loss)
        _check_loss_fits_data(cfg, loss_fn, data)
        optimizer = build_optimizer(cfg.optimizer, cfg.schedule, total_steps)
        loop = _build_loop(cfg, model, loss_fn, optimizer, data)
        with Run(cfg, overrides) as run:
            if t.print_gradients:
                _report_gradients(loop, run)
            result = fit(loop, data, run, t, total_steps)
            if cfg.tracking.log_model:
                _log_model(model, run, Path(output_dir or "."))
            _summarize(result, run)
    return result.objective


def fit(loop: StepLoop, data: Dataset, run: Run, t: DictConfig, total_steps: int) -> Result:
    """The controller: chunks of compiled steps; validation, logging and progress only between chunks."""
    val = _val_tensors(data)
    accuracy = data.task != "regression"
    k = t.steps_per_loop or 10  # auto: two short chunks, then sized from the measured step time
    step, calls, last = 0, 0, {}
    t_start = t_first = time.perf_counter()
    with _progress(t.progress and console.is_terminal, total_steps) as bar:
        task = bar.add_task("train", total=total_steps, loss=float("nan"))
        while step < total_steps:
            n = min(k, total_steps - step, _until_eval(step, t.eval_every))
            t0 = time.time()
            last = loop.run(n)
            run.sink.submit(Chunk(step, last, loop.variable_names, t0, time.time()))
            step, calls = step + n, calls + 1
            if calls == 1:
                t_first = time.perf_counter()  # steps/s is measured past the first call (trace + compile)
                steps_first = step
            elif calls == 2 and t.steps_per_loop is None:
                k = _auto_steps_per_loop(last, n, t_first)
            if val is not None and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                run.log(step, _prefixed("val", loop.evaluate(*val, accuracy)))
            bar.update(task, completed=step, loss=run.sink.latest.get("train/loss", float("nan")))
    train_loss = float(last["train/loss"][-1])  # host sync, once, at the end
    if step == steps_first:  # a single call: the rate includes the trace
        t_first, steps_first = t_start, 0
    steps_per_sec = (step - steps_first) / (time.perf_counter() - t_first)
    if val is not None:
        final = {k: float(v) for k, v in loop.evaluate(*val, accuracy).items()}
        objective = final["loss"]
    else:  # no held-out split: the objective is the loss over the whole training set
        final = {}
        objective = float(loop.evaluate(loop.x, loop.y)["loss"])
    summary = {"perf/steps_per_sec": steps_per_sec, **_prefixed("val", final)}
    if not final:
        summary["train/final_loss"] = objective
    run.log(step, summary)
    return Result(step, train_loss, final, steps_per_sec, objective)


def _auto_steps_per_loop(last: dict[str, tf.Tensor], n: int, t_start: float) -> int:
    """Steps per call so that one call lasts about CHUNK_SECONDS; measured once (one host sync)."""
    np.asarray(last["train/loss"])  # wait for the chunk so the time is real
    per_step = (time.perf_counter() - t_start) / n
    return int(np.clip(CHUNK_SECONDS / max(per_step, 1e-6), 1, MAX_STEPS_PER_LOOP))


def _until_eval(step: int, eval_every: int | None) -> int:
    return eval_every - step % eval_every if eval_every else 1 << 62


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def _total_steps(t: DictConfig, data: Dataset) -> int:
    n = len(data.x_train)
    if t.batch_size > n:
        raise TrainerError(f"trainer.batch_size={t.batch_size} is larger than the training set ({n} examples)")
    return t.epochs * (n // t.batch_size) if t.epochs else t.max_steps


def _val_tensors(data: Dataset) -> tuple[tf.Tensor, tf.Tensor] | None:
    if data.x_val is None:
        return None
    return tf.constant(data.x_val), tf.constant(data.y_val)


def _device(name: str):
    if name == "auto":
        return nullcontext()
    kind = {"cpu": "CPU", "gpu": "GPU"}.get(name)
    if kind and not tf.config.list_logical_devices(kind):
        raise TrainerError(f"trainer.device={name!r}: TensorFlow sees no {kind}; use auto or cpu")
    return tf.device(f"/{kind}:0" if kind else name)


def _build_loop(cfg: DictConfig, model, loss_fn, optimizer, data: Dataset) -> StepLoop:
    t = cfg.trainer
    try:
        loop = StepLoop(
            model, loss_fn, optimizer, data.x_train, data.y_train, t.batch_size,
            seed=t.seed, clip_norm=t.clip_norm, grad_norms=cfg.tracking.log_grad_norms, jit=t.jit,
        )  # fmt: skip
    except (ValueError, tf.errors.InvalidArgumentError) as e:
        raise TrainerError(f"model {cfg.model._target_} cannot take inputs of shape {data.x_train.shape[1:]}: "
                           f"{str(e).splitlines()[0]}") from e  # fmt: skip
    out_shape = tuple(model(data.x_train[:1]).shape[1:])
    if out_shape != data.y_train.shape[1:]:
        raise TrainerError(
            f"the model gives outputs of shape {out_shape} per example but the data's targets have shape "
            f"{data.y_train.shape[1:]}: set model.units={data.n_targets}"
        )
    return loop


def _check_loss_fits_data(cfg: DictConfig, loss_fn, data: Dataset) -> None:
    fn = getattr(loss_fn, "func", loss_fn)
    if fn in losses.CLASSIFICATION and not np.all(np.isin(data.y_train, (0.0, 1.0))):
        raise TrainerError(
            f"loss {fn.__name__} needs 0/1 (one-hot) targets but data {cfg.data._target_} has continuous ones: "
            "use loss=mse (or squared, mae, huber) for regression"
        )


def _report_gradients(loop: StepLoop, run: Run) -> None:
    """The GradientTape introduction's printout, for the batch the first step will see."""
    grads = {name.split("/")[-1]: g.numpy() for name, g in zip(loop.variable_names, loop.gradients(), strict=True)}
    for name, g in grads.items():
        print(f"Gradients of {name}: {g.item() if g.size == 1 else g}")
    run.log(0, {f"first_step/grad/{n}": g.item() for n, g in grads.items() if g.size == 1})
    run.log_text(json.dumps({n: g.tolist() for n, g in grads.items()}, indent=1), "first_step_gradients.json")


def _log_model(model, run: Run, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, keras.Model):
        path = output_dir / "model.keras"
        model.save(path)
    else:
        path = output_dir / "saved_model"
        tf.saved_model.save(model, str(path))
    run.log_artifact(path, "model")


def _summarize(r: Result, run: Run) -> None:
    val = ", ".join(f"val {k} {v:.6g}" for k, v in r.val.items()) or "no validation split"
    console.print(
        f"[bold]done[/bold]: {r.steps} steps, final train loss {r.train_loss:.6g}, {val}, "
        f"{r.steps_per_sec:,.0f} steps/s\nMLflow: {run.where}"
    )


def _progress(enabled: bool, total: int) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
        TimeRemainingColumn(), console=console, disable=not enabled,
    )  # fmt: skip


if os.environ.get("TRAINER_EAGER") == "1":  # debug the step eagerly, as Keras' run_eagerly does
    tf.config.run_functions_eagerly(True)
