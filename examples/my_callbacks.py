"""Two callbacks of your own, run between compiled chunks (README: Callbacks).

    cd examples
    python -m trainer model=mlp 'trainer.callbacks=[{_target_:my_callbacks.MeanLoss,every:100}]'
    python -m trainer experiment=tape_example trainer.max_steps=1000 \
        'trainer.callbacks=[{_target_:my_callbacks.StopAtLoss,target:0.01,every:10}]'

`arrays` holds the chunk's per-step values (`train/loss`, `train/lr`, `train/grad_norm`, ...); each is copied
to the host once per chunk, when first read. Never per step: the chunk already ran on the device.
"""

from __future__ import annotations

from trainer.callbacks import Callback, Context, StepArrays


class MeanLoss(Callback):
    """Logs `custom/mean_loss`, the mean training loss of the steps since its last point, every `every` steps
    (chunks end on those steps) or, with every=None, at the end of each chunk."""

    def __init__(self, every: int | None = None):
        self.every = every
        self.total, self.count = 0.0, 0

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> None:
        loss = arrays["train/loss"]  # one host copy for the chunk
        self.total, self.count = self.total + float(loss.sum(dtype="float64")), self.count + len(loss)
        if self.every is None or step % self.every == 0:
            ctx.log(step, {"custom/mean_loss": self.total / self.count})
            self.total, self.count = 0.0, 0


class StopAtLoss(Callback):
    """Ends training at the first chunk boundary where the chunk's last step has a training loss below `target`.

    Chunks are long under automatic steps-per-loop (hundreds of steps): `every: 10` makes one end at least every
    10 steps, so the run stops within 10 steps of the target (without it, the tape example with target 0.01
    stopped at step 709 where the loss passed 0.01 near step 22).
    """

    def __init__(self, target: float, every: int | None = None):
        self.target, self.every = target, every

    def on_chunk_end(self, ctx: Context, step: int, arrays: StepArrays) -> bool:
        return float(arrays["train/loss"][-1]) < self.target
