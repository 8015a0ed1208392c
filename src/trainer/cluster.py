"""Multi-worker training's cluster (trainer.strategy=multi_worker): who the workers are, a bounded wait for all of
them, then TensorFlow's MultiWorkerMirroredStrategy.

Who: `TF_CONFIG` when it is set; else, under SLURM's `srun`, TensorFlow's own `SlurmClusterResolver` reads the job
step's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE; it expands
the node list itself, no `scontrol`), the workers' ports counting up from trainer.slurm_port on each node; else
one worker on its own, as TensorFlow does.

Why the wait is ours. Measured (TF 2.21): MultiWorkerMirroredStrategy() in a worker whose peer never starts blocks
in one C++ call that holds the GIL (no other Python thread runs, the signal watcher of trainer.process included),
after TensorFlow has installed its own SIGTERM handler (its preemption notifier): the process printed nothing,
ignored SIGTERM and Ctrl-C, and only kill -9 ended it. So first, in Python, each worker listens on its own address
(a stand-in for the server TensorFlow starts there next) and connects to every other one's, until all answer or
trainer.cluster_timeout passes: then one line names the workers that did not. Only then does TensorFlow's set-up
run (about a second once all are up), watched under the CLI by a process of its own (WATCHDOG) that keeps the
same limit.

Signals. Under the CLI, SIGINT and SIGTERM are held (blocked) from the start of a multi-worker run until its
strategy exists (trainer.process.hold_signals): every thread a library starts inherits the block, so TensorFlow's
handler never takes one. The wait takes a held signal at once and ends the process with one line (`Stopped`,
exit 128 + the signal); during TensorFlow's set-up the watchdog sees it pending, says so in one line and ends the
process (SIGKILL: exit 137).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from omegaconf import DictConfig

from trainer.config import TrainerError, first_line
from trainer.process import exits_at_signals, held_signal, release_signals

PROBE_EVERY = 0.25  # seconds between rounds of connects
CONNECT_TIMEOUT = 1.0  # one connect's limit: a host that drops packets costs this much a round
COORDINATED = ("chief", "worker")  # the tasks MultiWorkerMirroredStrategy's collectives span
SLURM_STEP_VARS = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")


@dataclass(frozen=True)
class Task:
    kind: str  # chief | worker
    index: int
    address: str  # host:port

    def __str__(self) -> str:
        return f"{self.kind} {self.index} at {self.address}"


class Stopped(Exception):
    """SIGINT or SIGTERM while this worker waited for the others: the CLI prints one line and exits 128+signum."""

    def __init__(self, signum: int, waiting_for: list[Task]) -> None:
        self.signum = signum
        names = ", ".join(map(str, waiting_for)) or "TensorFlow's set-up"
        super().__init__(f"{signal.Signals(signum).name} while waiting for the cluster ({names})")


def strategy(t: DictConfig):
    """MultiWorkerMirroredStrategy over the cluster TF_CONFIG or SLURM names, once every worker has started."""
    import tensorflow as tf

    resolver, source = resolve(t)
    if resolver is None:  # one worker on its own: nothing to wait for
        release_signals()
        return tf.distribute.MultiWorkerMirroredStrategy()
    spec = {kind: list(tasks) for kind, tasks in resolver.cluster_spec().as_dict().items()}
    me = _own_task(spec, resolver.task_type, resolver.task_id, source)
    wait_for_peers(spec, me, t.cluster_timeout, source)
    limit = f"trainer.cluster_timeout={t.cluster_timeout:g}" if t.cluster_timeout else "no limit"
    overdue = (f"error: {limit}: every worker of {source} answered, but TensorFlow's set-up did not complete: another "
               "program holds a worker's port, or a worker stopped; start them again")  # fmt: skip
    with _watchdog(t.cluster_timeout, overdue) if exits_at_signals() else nullcontext():  # never a notebook's
        try:
            made = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as e:
            raise TrainerError(
                f"{limit}: every worker of {source} answered, but TensorFlow's set-up failed "
                f"({first_line(e)}): a worker stopped meanwhile; start them again"
            ) from None
    if signum := release_signals():  # TensorFlow's SIGTERM handler replaced by Python's again
        raise Stopped(signum, [])
    return made


# The watchdog of TensorFlow's own set-up, a process of its own: that set-up holds the GIL, so no Python thread of
# this process runs until it returns. Every 0.1 s it reads this process's pending signals (held: blocked in every
# thread, so TensorFlow's handler never takes them) from /proc; at SIGINT or SIGTERM, or once the limit has passed,
# it prints one line and ends this process with SIGKILL, the one signal that needs no handler. Where there is no
# /proc it only keeps the limit. It ends itself when this process goes away.
WATCHDOG = """
import os, sys, time
pid, limit, stopped, overdue = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
names = {2: "SIGINT", 15: "SIGTERM"}
end = time.monotonic() + limit if limit > 0 else float("inf")
def pending():
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return 0
    mask = int(fields.get("ShdPnd", "0"), 16) | int(fields.get("SigPnd", "0"), 16)
    return next((s for s in names if mask >> (s - 1) & 1), 0)
while os.getppid() == pid:
    signum = pending()
    if signum or time.monotonic() > end:
        sys.stderr.write((stopped.replace("SIGNAL", names[signum]) if signum else overdue) + "\\n")
        sys.stderr.flush()
        os.kill(pid, 9)
        break
    time.sleep(0.1)
"""


@contextmanager
def _watchdog(timeout: float | None, overdue: str) -> Iterator[None]:
    import subprocess

    stopped = "stopped: SIGNAL during TensorFlow's set-up of the cluster (every worker had answered)"
    watch = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(os.getpid()), str(timeout or 0), stopped,
                              overdue], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        yield
    finally:
        watch.kill()
        watch.wait()


def resolve(t: DictConfig):
    """(cluster resolver, where it came from), or (None, "") for one worker on its own."""
    import tensorflow as tf

    if t.get("slurm_port") is not None and ("TF_CONFIG" in os.environ or "SLURM_JOB_ID" not in os.environ):
        why = "TF_CONFIG is set and names the ports" if "TF_CONFIG" in os.environ else "this is not a SLURM job"
        raise TrainerError(f"trainer.slurm_port={t.slurm_port} is read only when the cluster comes from SLURM "
                           f"(srun, no TF_CONFIG), and {why}: drop it")  # fmt: skip
    if "TF_CONFIG" in os.environ:
        _check_tf_config(os.environ["TF_CONFIG"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver(), "TF_CONFIG"
    if "SLURM_JOB_ID" in os.environ:
        return _slurm_resolver(t.get("slurm_port")), "SLURM"
    return None, ""


def _check_tf_config(text: str) -> None:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainerError(f"TF_CONFIG is not JSON ({e}): set it as in the README, e.g. "
                           """'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", """
                           """"index": 0}}'""") from None  # fmt: skip
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise TrainerError(f"TF_CONFIG={text}: has no \"task\": {{\"type\": ..., \"index\": ...}}; give each worker "
                           """its own, e.g. "task": {"type": "worker", "index": 1}""")  # fmt: skip


def _slurm_resolver(port: int | None):
    """TensorFlow's SlurmClusterResolver for this srun step. It splits a node's GPUs among its tasks (setting
    CUDA_VISIBLE_DEVICES); on a node without GPUs it would find none to split and list no task (and without
    nvidia-smi it fails), so there each task gets a slot of its own and reports no GPU."""
    import tensorflow as tf

    missing = [name for name in SLURM_STEP_VARS if name not in os.environ]
    if missing:
        raise TrainerError(f"trainer.strategy=multi_worker under SLURM (SLURM_JOB_ID={os.environ['SLURM_JOB_ID']}) "
                           f"but {missing[0]} is not set: start one process per worker with srun (srun python -m "
                           "trainer trainer.strategy=multi_worker ...), or set TF_CONFIG")  # fmt: skip
    resolvers = tf.distribute.cluster_resolver
    ports = {} if port is None else {"port_base": port}  # None: the resolver's own first port (8888)
    try:
        if _visible_gpus():
            return resolvers.SlurmClusterResolver(**ports)
        tasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
        slurm = resolvers.SlurmClusterResolver(**ports, gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False)
        spec = slurm.cluster_spec()  # sets task_type and task_id
        return resolvers.SimpleClusterResolver(spec, task_type=slurm.task_type, task_id=slurm.task_id,
                                               rpc_layer="grpc")  # fmt: skip
    except (RuntimeError, ValueError) as e:
        found = ", ".join(f"{name}={os.environ.get(name)}" for name in SLURM_STEP_VARS)
        raise TrainerError(f"SLURM's job step ({found}) does not give a cluster: {first_line(e)}") from None


def _visible_gpus() -> int:
    """GPUs as SlurmClusterResolver counts them: CUDA_VISIBLE_DEVICES, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    return 1 if shutil.which("nvidia-smi") else 0  # the resolver counts them itself


def _own_task(spec: dict[str, list[str]], kind: str | None, index: int | None, source: str) -> Task:
    tasks = spec.get(kind or "", [])
    if index is None or not 0 <= index < len(tasks):
        known = ", ".join(f"{k} 0-{len(v) - 1}" for k, v in spec.items() if v) or "none"
        raise TrainerError(f"{source}: this worker is {kind} {index}, which its cluster does not have (it has "
                           f"{known}): give each worker a task of the cluster")  # fmt: skip
    return Task(kind, index, tasks[index])


def wait_for_peers(spec: dict[str, list[str]], me: Task, timeout: float | None, source: str) -> None:
    """Return once every other chief and worker task of `spec` accepts a TCP connection; TrainerError naming those
    that did not after `timeout` seconds (None: no limit); Stopped at a held SIGINT or SIGTERM."""
    peers = [Task(kind, i, address) for kind in COORDINATED for i, address in enumerate(spec.get(kind, []))
             if (kind, i) != (me.kind, me.index)]  # fmt: skip
    if not peers:
        return
    start, told = time.monotonic(), False
    with _stand_in(me, source) as drain:
        missing, why = peers, {}
        while True:
            drain()
            missing = [p for p in missing if not _answers(p, why)]
            if not missing:
                return
            waited = time.monotonic() - start
            if timeout and waited >= timeout:
                names = "; ".join(f"{p} ({why[p]})" for p in missing)
                raise TrainerError(f"trainer.cluster_timeout={timeout:g}: {names} did not start within {timeout:g} s "
                                   f"({source}): start {'it' if len(missing) == 1 else 'them'} with the same command "
                                   "and its own task, or raise trainer.cluster_timeout")  # fmt: skip
            if not told:  # once, as the wait begins
                limit = f"up to {timeout:g} s" if timeout else "with no limit"
                print(f"waiting {limit} for {', '.join(map(str, missing))} ({source}); this is {me}",
                      file=sys.stderr, flush=True)  # fmt: skip
                told = True
            signum = held_signal(PROBE_EVERY)
            if signum:
                raise Stopped(signum, missing)


def _answers(task: Task, why: dict) -> bool:
    host, _, port = task.address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
        return True
    except (OSError, ValueError) as e:
        why[task] = _reason(e)
        return False


def _reason(error: Exception) -> str:
    """An OS error's own words ("connection refused"), without what Python adds."""
    errno, words = getattr(error, "errno", None), getattr(error, "strerror", None)
    if errno and errno > 0:  # not a resolver's (socket.gaierror's are negative): create_server adds to strerror
        words = os.strerror(errno)
    return (words or str(error) or type(error).__name__).lower()


@contextmanager
def _stand_in(me: Task, source: str) -> Iterator:
    """Listen on this worker's own port while waiting, so the others see it has started (TensorFlow's server binds
    it only inside the set-up that would block); yields what accepts and closes their connects."""
    port = int(me.address.rpartition(":")[2])
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", port))
    except OSError as e:
        raise TrainerError(f"{source}: this worker is {me}, but port {port} cannot be listened on ({_reason(e)}): "
                           "another program (or a worker still running) holds it; end it, or give this worker "
                           "another port") from None  # fmt: skip
    server.setblocking(False)

    def drain() -> None:
        while True:
            try:
                server.accept()[0].close()
            except OSError:  # none waiting
                return

    try:
        yield drain
    finally:
        server.close()
