"""Process-wide state a run changes, set and restored in one place: `process_settings`, entered once by train().

A run in a process that goes on (a notebook, an in-process Hydra multirun, the tests) leaves it as it found it:
  - SIGINT and SIGTERM: while the controller trains (`StopFlag.armed`), the first ends the run at the next chunk
    boundary (checkpoint, flush, KILLED) and a second one at once; outside that window they do what they did
    before the run (Python's KeyboardInterrupt, the default termination). Under the CLI (`stop_within`), a
    thread hears the signal at once, even while the training thread is inside one long TensorFlow call, where
    Python's own handler cannot run: a 610,368-class model took 295 s to exit after SIGTERM, printing nothing.
    If the round has not ended STOP_GRACE_SECONDS after the first signal (or at a second one), the run is
    marked KILLED and the process exits, as after kill -9 but said and recorded: the resume starts from the
    newest durable checkpoint.
  - The GIL switch interval: 0.2 ms instead of Python's 5 ms. Between chunks the training thread needs the GIL
    for a few short stretches (the compiled call's return, one scalar, the hand-off to the sink) while the
    sink's threads run Python; at the default interval each stretch could wait up to 5 ms, measured as ~10%
    of a small model's steps/s.
  - Keras' global dtype policy (trainer.precision), which every Keras layer built later would otherwise take.
Not restored, and why: TensorFlow's thread pools and logical devices (trainer.intra_op_threads,
inter_op_threads, logical_cpus; train._strategy) are fixed when TensorFlow starts and cannot change after;
op determinism (trainer.deterministic) has no public switch back; the seeds are the run's starting state.
The sink's threads lower their own priority (tracking/sink.py); on Linux that is per thread and ends with them.

Held signals (`hold_signals`): the CLI blocks SIGINT and SIGTERM as a single run starts, before any library
starts a thread (numpy's, pyarrow's, TensorFlow's: each inherits the block), and releases them once the config
is known, except for a multi-worker run: that one holds them until its strategy exists, so that the SIGTERM
handler TensorFlow installs during MultiWorkerMirroredStrategy's set-up never takes one. The cluster's wait takes
them (`held_signal`); `release_signals` ends the hold with Python's handlers in place again (trainer/cluster.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

GIL_SWITCH_SECONDS = 2e-4
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_SECONDS = 20.0  # from the first signal to the exit, at most: the end of a round (a chunk of ~0.2 s, a
# validation pass, a checkpoint: 1.6 GB of them took 4.5 s here); under Kubernetes' 30-s grace before its SIGKILL
_WATCHED = {"on": False}  # set by the CLI (stop_within): an in-process caller (a notebook) is never exited
_HELD = {"on": False}  # SIGINT and SIGTERM blocked in the main thread (hold_signals)


def stop_within() -> None:
    """The CLI's processes end at most STOP_GRACE_SECONDS after a signal, whatever the model's size."""
    _WATCHED["on"] = True


def exits_at_signals() -> bool:
    """Whether this process is the CLI's (stop_within): one a signal may end; never an in-process caller's."""
    return _WATCHED["on"]


def hold_signals() -> None:
    """Block SIGINT and SIGTERM in this (the main) thread and every thread started from now on, until
    release_signals: one sent meanwhile waits, pending, for held_signal or the release. Only from the main
    thread (the one signals are meant for, and the only one that can release them)."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        _HELD["on"] = True


def held_signal(seconds: float) -> int:
    """Wait up to `seconds` for a held SIGINT or SIGTERM and take it: its number, or 0. Without a hold, a sleep
    (Python's handlers run as usual)."""
    if not _HELD["on"]:
        time.sleep(seconds)
        return 0
    info = signal.sigtimedwait(SIGNALS, seconds)
    return info.si_signo if info is not None else 0


def release_signals(take: bool = True) -> int:
    """Put back the handlers Python holds for SIGINT and SIGTERM (a library may have installed its own in C:
    TensorFlow's preemption notifier does for SIGTERM), then end any hold. `take`: a signal held meanwhile is
    taken and returned (0: none); else it reaches those handlers as the hold ends. Only the main thread can do
    either: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        return 0
    pending = held_signal(0) if _HELD["on"] and take else 0
    for signum in SIGNALS:
        if (handler := signal.getsignal(signum)) is not None:  # None: not one Python installed
            signal.signal(signum, handler)
    if _HELD["on"]:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        _HELD["on"] = False
    return pending


@dataclass
class StopFlag:
    """The signal that asked training to stop (0: none yet); signals count only while `armed`.

    `on_overdue(signum)`: what is recorded before a watched process exits without its round's end (train sets
    it: the line on the console, the run KILLED)."""

    signum: int = 0
    armed: bool = False
    watched: bool = False
    on_overdue: Callable[[int], None] | None = None
    _received: int = 0
    _timer: threading.Timer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def catching(self) -> Iterator[StopFlag]:
        """While training: a signal stops the run at the next chunk boundary instead of at once."""
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False
            if self._timer is not None:
                self._timer.cancel()

    def receive(self, signum: int) -> None:
        """A signal while armed (the watcher thread): the first asks for a stop at the round's end and starts
        the grace period; a second one is overdue at once."""
        with self._lock:
            self._received += 1
            first = self._received == 1
            if first:
                self.signum = signum
                self._timer = threading.Timer(STOP_GRACE_SECONDS, self._overdue, [signum])
                self._timer.daemon = True
                self._timer.start()
        if first:
            print(f"{signal.Signals(signum).name}: stopping after this chunk (again to stop now; at the latest in "
                  f"{STOP_GRACE_SECONDS:g} s)", file=sys.stderr, flush=True)  # fmt: skip
        else:
            self._overdue(signum)

    def _overdue(self, signum: int) -> None:
        if not self.armed:  # the round ended in time: the run stops the ordinary way
            return
        if self.on_overdue is not None:
            done = threading.Thread(target=self.on_overdue, args=(signum,), daemon=True)
            done.start()
            done.join(OVERDUE_RECORD_SECONDS)  # a stalled store does not hold the exit
        sys.stderr.flush()
        os._exit(128 + signum)


OVERDUE_RECORD_SECONDS = 5.0  # for marking the run KILLED before a hard stop


@contextmanager
def process_settings(precision: str) -> Iterator[StopFlag]:
    """Set what a run needs of the process; give back what was there before, however the run ends."""
    import keras  # here: the CLI holds signals through this module before TensorFlow's import (hold_signals)

    release_signals(take=False)  # a run never trains with them held (one held meanwhile is handled as below)
    main = threading.current_thread() is threading.main_thread()
    flag = StopFlag(watched=main and _WATCHED["on"])
    policy, interval = keras.config.dtype_policy(), sys.getswitchinterval()
    handlers = _install_handlers(flag) if main else {}
    unwatch = _watch(flag) if flag.watched else None
    try:
        keras.config.set_dtype_policy(precision)  # before the model is built; the loss stays float32
        sys.setswitchinterval(min(interval, GIL_SWITCH_SECONDS))
        yield flag
    finally:
        if unwatch is not None:
            unwatch()
        sys.setswitchinterval(interval)
        keras.config.set_dtype_policy(policy)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _install_handlers(flag: StopFlag) -> dict[int, object]:
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def handler(signum: int, frame) -> None:
        if not flag.armed:
            _as_before(previous[signum], signum, frame)
        elif flag.watched:  # the watcher thread has it (StopFlag.receive)
            return
        elif flag.signum:
            raise KeyboardInterrupt
        else:
            flag.signum = signum
            print(f"{signal.Signals(signum).name}: stopping after this chunk (again to stop now)", file=sys.stderr)

    for signum in SIGNALS:
        signal.signal(signum, handler)
    return previous


def _watch(flag: StopFlag) -> Callable[[], None]:
    """Hear signals on a thread of their own: Python's C-level handler writes each signal's number to the wakeup
    fd as it arrives, while its Python handler waits for the main thread to leave TensorFlow's call. Returns
    what undoes it."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def listen() -> None:
        while data := os.read(read, 64):
            for signum in data:
                if signum in SIGNALS and flag.armed:
                    flag.receive(signum)

    thread = threading.Thread(target=listen, name="trainer-signals", daemon=True)
    thread.start()

    def unwatch() -> None:
        signal.set_wakeup_fd(previous)
        os.close(write)  # the listener reads the end of the pipe and returns
        thread.join(1.0)
        os.close(read)

    return unwatch


def _as_before(previous: object, signum: int, frame) -> None:
    """What the signal did before the run: a Python handler, ignored, or the default (here, termination)."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
