"""The LR range test: `python -m trainer lr_find=true` (or `trainer lr-find`), and `optimizer.lr=auto`.

One ordinary run of the configured model and data (train.train, the same compiled loop), `lr_finder.steps`
long, whose schedule is optim.lr_range: the learning rate rises exponentially from `lr_finder.min_lr` to
`lr_finder.max_lr` (Lightning's Tuner.lr_find: 1e-7 to 10 over 100 steps). Every step's loss and lr are
gathered on the device by the loop as in any run and logged as its metrics; the LRCurve action reads them
once per chunk (the finder's chunks are FINDER_CHUNK steps) to stop early once the loss diverges, a stop
like early stopping's, not an error.

The rule (fastai's `valley`, lr_find.suggest): smooth the loss with Lightning's bias-corrected moving
average (beta 0.98), trim the noisy edges (the first tenth: the average still warming up; the last five: the
divergence cliff), and suggest the lr two thirds of the way down the longest descending stretch of the smoothed
loss. Chosen over Lightning's steepest gradient by measurement (suggest's docstring, README: LR finder).

The finder's run is tagged `lr_find=true`; `optimizer.lr=auto` runs it in `<output dir>/lr_find`, then
trains from fresh weights (train.train clears the Keras session and re-seeds) with the suggestion as
optimizer.lr, tagged `lr_find.run_id` and `lr_find.suggestion`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from trainer.callbacks import Callback, Context, StepArrays
from trainer.config import TrainerError

BETA = 0.98  # Lightning's and fastai's smoothing of the loss
TRIM_END = 5  # fastai's lr_find drops the first tenth of the points and the last five
FINDER_CHUNK = 10  # steps per compiled call: a divergence stop overshoots by fewer than this many steps
TAG = "lr_find"


@dataclass
class LRCurve(Callback):
    """Collects each chunk's lr and loss (one host copy per chunk), stops once the smoothed loss diverges, and at
    the end logs the curve (lr_find.json), its plot (lr_find.png) and the suggestion to the finder's run."""

    divergence: float
    output_dir: Path
    average: float = 0.0  # the moving average before bias correction
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    steps_run: int = 0
    diverged_at: int | None = None  # the step whose smoothed loss passed divergence x the best
    suggestion: float | None = None
    run_id: str = ""

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> bool:
        self.steps_run = step
        if self.diverged_at is not None:
            return True
        for i, (lr, loss) in enumerate(zip(arrays["train/lr"], arrays["train/loss"], strict=True)):
            if not self._add(float(lr), float(loss)):
                self.diverged_at = arrays.first_step + i
                ctx.run.set_tag("lr_find.diverged_at_step", str(self.diverged_at))
                return True
        return False

    def _add(self, lr: float, loss: float) -> bool:
        """One point; False (and not kept) when the loss is non-finite or the smoothed loss diverged."""
        if not np.isfinite(loss):
            return False
        n = len(self.losses)
        average = BETA * self.average + (1 - BETA) * loss
        value = average / (1 - BETA ** (n + 1))  # bias-corrected, as Lightning's _LRCallback
        if n and value > self.divergence * min(self.smoothed):
            return False
        self.average = average
        self.lrs.append(lr), self.losses.append(loss), self.smoothed.append(value)
        return True

    def on_train_end(self, ctx: Context, result: object) -> None:
        if result is None:  # an error or a signal: nothing to suggest
            return
        self.run_id = getattr(ctx.run, "run_id", "")
        self.suggestion = suggest(self.lrs, self.smoothed)
        if self.suggestion is not None:
            ctx.run.set_tag("lr_find.suggestion", repr(self.suggestion))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        curve = {"lr": self.lrs, "loss": self.losses, "smoothed_loss": self.smoothed, "steps_run": self.steps_run,
                 "diverged_at_step": self.diverged_at, "suggestion": self.suggestion,
                 "rule": "fastai valley of the smoothed loss"}  # fmt: skip
        ctx.run.log_text(json.dumps(curve, indent=1), "lr_find.json")
        png = plot(self.lrs, self.losses, self.smoothed, self.suggestion, self.output_dir / "lr_find.png")
        ctx.run.log_artifact(png)


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> float | None:
    """fastai's `valley` rule: in the smoothed loss, edges trimmed (the first tenth, the last TRIM_END points),
    find the longest run of points that each lie below an earlier one (the longest decreasing subsequence, the
    "valley"), and suggest the lr two thirds of the way from its start to its bottom (fastai: start + 1/3 + 1/6
    of its length). Three significant figures, so the param reads as a number; None below 3 points.

    Measured on digits (MLP classifier, Adam, 300-step runs; good range 1e-3..3e-2, where the final val loss is
    within 1.5x the best): seeds 0, 1, 2 gave 2.3e-3, 1.0e-2, 8.5e-3. Lightning's steepest negative gradient
    of the same curves gave 2.6e-2, 2.2e-2, 1.8e-2: the top edge of the range (5e-2 was already 2x the best
    loss), and lr 1.07 once the curve ran past its minimum.
    """
    n = len(smoothed)
    loss = np.asarray(smoothed[n // 10 : n - TRIM_END])
    if len(loss) < 3:
        return None
    longest = np.ones(len(loss), dtype=int)  # the longest decreasing run ending at each point
    start = end = 0
    for i in range(1, len(loss)):
        below = loss[:i] > loss[i]
        if below.any():
            longest[i] = 1 + longest[:i][below].max()
        if longest[i] > longest[end]:
            end, start = i, i - int(longest[i])
    third = (end - start) / 3
    return float(f"{lrs[n // 10 + start + int(third) + int(third / 2)]:.3g}")


def plot(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float | None,
         path: Path) -> Path:  # fmt: skip
    """Loss against lr on a log x-axis: each step's loss faint, the smoothed loss, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, lw=1, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label=f"smoothed (beta {BETA})")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", lw=1)
        at = smoothed[int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggestion))))]
        ax.plot([suggestion], [at], "o", color="tab:red", label=f"suggestion {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    ax.legend(loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def finder_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The run's config, made the range test: lr_finder.steps steps from optimizer.lr=min_lr, no validation
    during it, no checkpoints past the end, no early stopping, no model logged; a non-finite step is skipped
    (and ends the test), never the run's failure."""
    f, found = cfg.lr_finder, copy.deepcopy(cfg)
    found.lr_find = False
    found.optimizer.lr = float(f.min_lr)
    t = found.trainer
    t.max_steps, t.epochs, t.eval_every, t.checkpoint_every = int(f.steps), None, None, None
    t.early_stopping.patience, t.callbacks, t.profile, t.print_gradients = None, [], None, False
    t.on_nonfinite, t.max_skipped_fraction = "skip_step", 1.0
    t.steps_per_loop = min(t.steps_per_loop or FINDER_CHUNK, FINDER_CHUNK)
    found.tracking.log_model, found.tracking.register_model = False, None
    if found.tracking.get("tensorboard_dir"):  # the range test's event files beside the run's, not among them
        found.tracking.tensorboard_dir = str(Path(found.tracking.tensorboard_dir) / "lr_find")
    shown = [o for o in overrides if not o.startswith(("tracking.", "hydra.", "lr_find", "optimizer.lr="))]
    found.tracking.run_name = f"lr-find {cfg.tracking.run_name or ' '.join(shown)}".strip()[:250]
    return found


def find(cfg: DictConfig, overrides: Sequence[str], output_dir: Path, tags: dict[str, str] | None) -> LRCurve:
    """Run the range test as its own MLflow run; its curve, suggestion and run id. No suggestion is an error."""
    from trainer.optim import lr_range
    from trainer.train import train

    f = cfg.lr_finder
    curve = LRCurve(float(f.divergence), output_dir)
    tags = {**(tags or {}), TAG: "true", "lr_find.range": f"{f.min_lr:g}..{f.max_lr:g} over {f.steps} steps"}
    schedule = lr_range(float(f.min_lr), float(f.max_lr), int(f.steps))
    train(finder_config(cfg, overrides), overrides, output_dir, tags, [curve], schedule=schedule)
    if curve.suggestion is None:
        raise TrainerError(
            f"lr_find: the loss diverged after {len(curve.losses)} steps, too few to suggest a learning rate "
            f"(at least {TRIM_END + 3} needed): lower lr_finder.min_lr={f.min_lr:g}, or raise "
            f"lr_finder.steps={f.steps}"
        )
    return curve


def run(cfg: DictConfig, overrides: Sequence[str], output_dir: Path, tags: dict[str, str] | None) -> float:
    """lr_find=true: the range test only; prints the suggestion in one line and returns it."""
    curve = find(cfg, overrides, output_dir, tags)
    _say(curve, "")
    return float(curve.suggestion)


def resolve_auto(cfg: DictConfig, overrides: Sequence[str], output_dir: Path,
                 tags: dict[str, str] | None) -> tuple[DictConfig, dict[str, str]]:  # fmt: skip
    """optimizer.lr=auto: the range test (in output_dir/lr_find), then the config to train with the suggestion
    and the tags that link the training run to the finder's."""
    curve = find(cfg, overrides, output_dir / "lr_find", tags)
    _say(curve, "; training with it")
    trained = copy.deepcopy(cfg)
    trained.optimizer.lr = float(curve.suggestion)
    return trained, {**(tags or {}), "lr_find.run_id": curve.run_id, "lr_find.suggestion": repr(curve.suggestion)}


def _say(curve: LRCurve, then: str) -> None:
    stop = f", stopped at step {curve.steps_run} (loss diverged)" if curve.diverged_at is not None else ""
    print(f"lr_find: suggested optimizer.lr={curve.suggestion:g} (fastai's valley rule{stop}; "
          f"run {curve.run_id}){then}", flush=True)  # fmt: skip
