"""Training steps: the contract (`Step`, `Ops`) and the built-ins a `step` config node names by `_target_`."""

from trainer.steps.base import Layout, Ops, Slot, Step, StepError, layout_of
from trainer.steps.gan import GAN
from trainer.steps.pinn import Oscillator
from trainer.steps.supervised import SAM, Adversarial, Supervised

__all__ = [
    "GAN",
    "SAM",
    "Adversarial",
    "Layout",
    "Ops",
    "Oscillator",
    "Slot",
    "Step",
    "StepError",
    "Supervised",
    "layout_of",
]
