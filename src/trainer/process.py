"""Process-wide state a run changes, set and restored in one place: `process_settings`, entered once by train().

A run in a process that goes on (a notebook, an in-process Hydra multirun, the tests) leaves it as it found it:
  - SIGINT and SIGTERM: while the controller trains (`StopFlag.armed`), the first ends the run at the next chunk
    boundary (checkpoint, flush, KILLED) and a second one at once; outside that window they do what they did
    before the run (Python's KeyboardInterrupt, the default termination).
  - The GIL switch interval: 0.2 ms instead of Python's 5 ms. Between chunks the training thread needs the GIL
    for a few short stretches (the compiled call's return, one scalar, the hand-off to the sink) while the
    sink's threads run Python; at the default interval each stretch could wait up to 5 ms, measured as ~10%
    of a small model's steps/s.
  - Keras' global dtype policy (trainer.precision), which every Keras layer built later would otherwise take.
Not restored, and why: TensorFlow's thread pools and logical devices (trainer.intra_op_threads,
inter_op_threads, logical_cpus; train._strategy) are fixed when TensorFlow starts and cannot change after;
op determinism (trainer.deterministic) has no public switch back; the seeds are the run's starting state.
The sink's threads lower their own priority (tracking/sink.py); on Linux that is per thread and ends with them.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import keras

GIL_SWITCH_SECONDS = 2e-4
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopFlag:
    """The signal that asked training to stop (0: none yet); signals count only while `armed`."""

    signum: int = 0
    armed: bool = False

    @contextmanager
    def catching(self) -> Iterator[StopFlag]:
        """While training: a signal stops the run at the next chunk boundary instead of at once."""
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False


@contextmanager
def process_settings(precision: str) -> Iterator[StopFlag]:
    """Set what a run needs of the process; give back what was there before, however the run ends."""
    flag = StopFlag()
    policy, interval = keras.config.dtype_policy(), sys.getswitchinterval()
    handlers = _install_handlers(flag) if threading.current_thread() is threading.main_thread() else {}
    try:
        keras.config.set_dtype_policy(precision)  # before the model is built; the loss stays float32
        sys.setswitchinterval(min(interval, GIL_SWITCH_SECONDS))
        yield flag
    finally:
        sys.setswitchinterval(interval)
        keras.config.set_dtype_policy(policy)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _install_handlers(flag: StopFlag) -> dict[int, object]:
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def handler(signum: int, frame) -> None:
        if not flag.armed:
            _as_before(previous[signum], signum, frame)
        elif flag.signum:
            raise KeyboardInterrupt
        else:
            flag.signum = signum
            print(f"{signal.Signals(signum).name}: stopping after this chunk (again to stop now)", file=sys.stderr)

    for signum in SIGNALS:
        signal.signal(signum, handler)
    return previous


def _as_before(previous: object, signum: int, frame) -> None:
    """What the signal did before the run: a Python handler, ignored, or the default (here, termination)."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
