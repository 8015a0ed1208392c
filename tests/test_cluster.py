"""Multi-worker training beyond one process (trainer/cluster.py): the README's two-worker recipe on one machine,
SLURM's srun on one machine, the bounded and interruptible wait for a worker that never starts, and launcher=slurm
off a cluster. Real processes, ports and signals."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from trainer.cluster import Task, wait_for_peers
from trainer.config import TrainerError

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPE_PORTS = ("12345", "12346")  # the README's; each test run takes free ones


def free_ports(n: int, consecutive: bool = False) -> list[int]:
    """n ports free on this machine now (consecutive: p, p+1, ..., as SLURM's resolver numbers a node's tasks)."""
    while True:
        sockets = [socket.socket() for _ in range(n if not consecutive else 1)]
        for s in sockets:
            s.bind(("", 0))
        ports = [s.getsockname()[1] for s in sockets]
        if consecutive:
            ports = list(range(ports[0], ports[0] + n))
            try:
                sockets += [socket.create_server(("", p)) for p in ports[1:]]
            except OSError:
                ports = []
        for s in sockets:
            s.close()
        if ports:
            return ports


def trainer_env(**extra: str) -> dict[str, str]:
    """This environment less what would pick another cluster or store, plus `extra`."""
    dropped = ("TF_CONFIG", "MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("SLURM_")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def readme_recipe() -> list[tuple[str, list[str]]]:
    """The one-machine recipe as the README writes it: (TF_CONFIG, the trainer's arguments) for each shell."""
    section = README.read_text().split("### Trying it on one machine\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    configs = [shlex.split(line.removeprefix("export TF_CONFIG="))[0] for line in block
               if line.startswith("export TF_CONFIG=")]  # fmt: skip
    commands = [shlex.split(line)[3:] for line in block if line.startswith("python -m trainer ")]
    return list(zip(configs, commands, strict=True))


def steps_logged(uri: str, key: str = "train/loss") -> list[int]:
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tape-trainer").experiment_id])
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def checkpoint_weights(directory: Path) -> list[np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(directory))
    return [reader.get_tensor(n) for n in sorted(reader.get_variable_to_shape_map()) if n.startswith("model/")]


@pytest.mark.slow  # two trainer processes: 21-28 s here
def test_the_readme_recipe_two_workers_on_one_machine_one_run_same_weights(tmp_path):
    """The README's two commands as written (its ports swapped for free ones), each in a shell of its own: the run
    in ./mlflow.db holds every step once (only worker 0 logs), and both workers end with the same weights."""
    recipe = readme_recipe()
    assert [json.loads(c)["task"] for c, _ in recipe] == [{"type": "worker", "index": i} for i in (0, 1)]
    ports = free_ports(2)
    procs = []
    for tf_config, args in recipe:
        for theirs, ours in zip(RECIPE_PORTS, ports, strict=True):
            tf_config = tf_config.replace(theirs, str(ours))
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=tmp_path,
                                      env=trainer_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    assert "not logged here: this worker is not the chief" in "".join(outputs[1])  # worker 1's "done" line
    steps = int(next(a for a in recipe[0][1] if a.startswith("trainer.max_steps=")).partition("=")[2])
    assert steps_logged(f"sqlite:///{tmp_path}/mlflow.db") == list(range(steps))
    chief = checkpoint_weights(tmp_path / "outputs" / "worker0" / "checkpoints")
    other = checkpoint_weights(tmp_path / "outputs" / "worker1" / "checkpoints-worker1")
    assert len(chief) == len(other) > 0
    for a, b in zip(chief, other, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two trainer processes: ~18 s here
def test_srun_on_one_machine_two_tasks_through_slurm_cluster_resolver(tmp_path):
    """`srun -n 2 python -m trainer trainer.strategy=multi_worker` without a cluster: each task gets the variables
    srun sets for a 2-task step on one node (localhost); TensorFlow's SlurmClusterResolver makes the cluster (it
    expands the node list itself: no scontrol is called). CUDA_VISIBLE_DEVICES="": a node without GPUs, here
    and on a machine that has some."""
    base, _ = free_ports(2, consecutive=True)
    uri, steps, procs = f"sqlite:///{tmp_path}/mlflow.db", 20, []
    for rank in range(2):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
                 "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0",
                 "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
                 "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
        cmd = [sys.executable, "-m", "trainer", "trainer.strategy=multi_worker", f"trainer.slurm_port={base}",
               "model=mlp", "data.n_samples=512", f"trainer.max_steps={steps}", f"tracking.uri={uri}",
               f"hydra.run.dir={tmp_path}/task{rank}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=trainer_env(**slurm), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert steps_logged(uri) == list(range(steps))  # task 0 logged each step once; task 1 nothing
    assert (tmp_path / "task1" / "checkpoints-worker1").is_dir()


def lone_worker(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, list[int], float]:
    """Worker 0 of a 2-worker TF_CONFIG whose worker 1 never starts: the process, the ports, and the time its
    'waiting' line came (it is printed as the wait begins)."""
    ports = free_ports(2)
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                            "task": {"type": "worker", "index": 0}})  # fmt: skip
    cmd = [sys.executable, "-m", "trainer", "trainer.strategy=multi_worker", "model=mlp",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/w0", *args]  # fmt: skip
    as_from_a_terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (a background job ignores it)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=trainer_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)  # fmt: skip
    first = proc.stderr.readline()
    assert first.startswith("waiting up to "), first + proc.stderr.read()[-2000:]
    assert f"for worker 1 at 127.0.0.1:{ports[1]} (TF_CONFIG); this is worker 0 at 127.0.0.1:{ports[0]}" in first
    return proc, ports, time.monotonic()


@pytest.mark.slow  # ~7 s, a whole process: the fast suite stays under 10 minutes
def test_a_worker_whose_peer_never_starts_names_it_after_cluster_timeout(tmp_path):  # one process: 9-12 s
    """Before: it waited forever, printing nothing, deaf to SIGTERM and Ctrl-C (only kill -9 ended it)."""
    proc, ports, waiting = lone_worker(tmp_path, "trainer.cluster_timeout=3")
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - waiting
    assert proc.returncode == 1
    assert err.splitlines() == [
        f"error: trainer.cluster_timeout=3: worker 1 at 127.0.0.1:{ports[1]} (connection refused) did not start "
        "within 3 s (TF_CONFIG): start it with the same command and its own task, or raise trainer.cluster_timeout"
    ]
    assert 3 <= took < 3 + 5, took
    assert not (tmp_path / "mlflow.db").exists()  # no run was begun


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_ends_a_waiting_worker_within_seconds(tmp_path, signum):
    proc, ports, _ = lone_worker(tmp_path)  # the default cluster_timeout, 120 s
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert err.splitlines() == [f"stopped: {name} while waiting for the cluster (worker 1 at 127.0.0.1:{ports[1]})"]
    assert took < 5, took


@pytest.mark.slow  # one trainer process each: 8-13 s here
@pytest.mark.parametrize("signum", [None, signal.SIGTERM])
def test_tensorflows_own_set_up_is_bounded_and_ends_at_a_signal(tmp_path, signum):
    """Worker 1's port is held by another program: the wait passes (it answers), then TensorFlow's set-up waits
    for a worker that never registers, in one call that holds the GIL. Its watchdog process keeps the limit, and
    ends it within a second of a signal."""
    ports = free_ports(2)
    squatter = socket.create_server(("127.0.0.1", ports[1]))
    tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                            "task": {"type": "worker", "index": 0}})  # fmt: skip
    limit = 8 if signum is None else 60
    cmd = [sys.executable, "-m", "trainer", "trainer.strategy=multi_worker", "model=mlp",
           f"trainer.cluster_timeout={limit}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
           f"hydra.run.dir={tmp_path}/w0"]  # fmt: skip
    start = time.monotonic()
    with squatter:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=trainer_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        if signum is not None:
            _wait_for_watchdog(proc.pid)
            sent = time.monotonic()
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # the one signal that needs no handler (a shell shows 137)
    if signum is None:
        assert err.splitlines() == [
            f"error: trainer.cluster_timeout={limit}: every worker of TF_CONFIG answered, but TensorFlow's set-up did "
            "not complete: another program holds a worker's port, or a worker stopped; start them again"
        ]
        assert time.monotonic() - start < 60
    else:
        assert err.splitlines() == ["stopped: SIGTERM during TensorFlow's set-up of the cluster (every worker had "
                                    "answered)"]  # fmt: skip
        assert time.monotonic() - sent < 3


def _wait_for_watchdog(pid: int) -> None:
    """Until the trainer's watchdog process runs: TensorFlow's set-up has begun."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        children = subprocess.run(["ps", "--ppid", str(pid), "-o", "args="], capture_output=True, text=True).stdout
        if " -I -S -c " in children:
            time.sleep(1)  # well inside the set-up
            return
        time.sleep(0.2)
    raise AssertionError("no watchdog process appeared")


# --- the wait itself, in this process: real sockets -------------------------------------------------------------
def test_the_wait_returns_once_every_other_worker_listens():
    mine, theirs = free_ports(2)
    with socket.create_server(("127.0.0.1", theirs)):
        spec = {"worker": [f"127.0.0.1:{mine}", f"127.0.0.1:{theirs}"]}
        start = time.monotonic()
        wait_for_peers(spec, Task("worker", 0, spec["worker"][0]), 5, "TF_CONFIG")
        assert time.monotonic() - start < 1


def test_the_wait_names_each_missing_worker_after_the_timeout(capsys):
    ports = free_ports(3)
    spec = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{p}" for p in ports[1:]]}
    start = time.monotonic()
    with pytest.raises(TrainerError) as info:
        wait_for_peers(spec, Task("worker", 1, spec["worker"][1]), 0.5, "TF_CONFIG")
    assert 0.5 <= time.monotonic() - start < 2
    assert str(info.value) == (
        f"trainer.cluster_timeout=0.5: chief 0 at 127.0.0.1:{ports[0]} (connection refused); worker 0 at "
        f"127.0.0.1:{ports[1]} (connection refused) did not start within 0.5 s (TF_CONFIG): start them with the same "
        "command and its own task, or raise trainer.cluster_timeout"
    )
    assert capsys.readouterr().err == (
        f"waiting up to 0.5 s for chief 0 at 127.0.0.1:{ports[0]}, worker 0 at 127.0.0.1:{ports[1]} (TF_CONFIG); "
        f"this is worker 1 at 127.0.0.1:{ports[2]}\n"
    )


def test_a_worker_whose_own_port_is_taken_says_so():
    mine, theirs = free_ports(2)
    with socket.create_server(("", mine)):
        spec = {"worker": [f"127.0.0.1:{mine}", f"127.0.0.1:{theirs}"]}
        with pytest.raises(TrainerError) as info:
            wait_for_peers(spec, Task("worker", 0, spec["worker"][0]), 5, "TF_CONFIG")
    assert str(info.value).startswith(f"TF_CONFIG: this worker is worker 0 at 127.0.0.1:{mine}, but port {mine} "
                                      "cannot be listened on (address already in use)")  # fmt: skip


def test_held_signals_wait_for_the_release_and_pythons_handlers_come_back():
    """A signal sent while held is taken by the release, even after a library set its own disposition in C
    (TensorFlow's set-up installs a SIGTERM handler); after it, SIGTERM does what Python's handler says again."""
    code = (
        "import ctypes, os, signal\n"
        "from trainer import process\n"
        "process.hold_signals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"  # held: pending, not delivered
        "libc = ctypes.CDLL(None)\n"  # a handler set in C behind Python's back, as TensorFlow's (here getpid)
        "libc.signal(ctypes.c_int(signal.SIGTERM), ctypes.cast(libc.getpid, ctypes.c_void_p))\n"
        "print(process.release_signals(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"  # Python's disposition again: the default, termination
        "print('survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=trainer_env(), capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"{int(signal.SIGTERM)}\n", proc.stderr
    assert proc.returncode == -signal.SIGTERM
