"""One way to start the real CLIs as local processes (several joined by ``jax.distributed`` on 127.0.0.1,
CPU devices forced per process, gloo collectives), each with a deadline: nothing may hang. Used by the
multi-process, preemption and gs:// workdir tests."""
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO

TIMEOUT = 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(devices: int | None = None, extra: dict | None = None) -> dict:
    """The environment of a user's shell (no forced devices unless ``devices``), offline, CPU."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if devices:
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env.update(extra or {})
    return env


def tiny_train_args(model_dir, data_file, **overrides) -> list:
    """``--config.*`` flags of a short IOPO run of the tiny model on ``data_file`` (float32, no validation
    split, synchronous checkpoints); ``overrides`` replace or add fields, e.g. ``train__eval_every=4`` for
    ``--config.train.eval_every=4``."""
    fields = {"model.path": model_dir, "data.train_files": data_file, "data.val_fraction": 0,
              "data.val_count": 4, "data.cutoff_len": 256, "data.batch_size": 2, "data.num_epochs": 1,
              "model.dtype": "float32", "optimizer.lr": 1e-2, "optimizer.grad_accum": 1,
              "train.eval_every": 0, "train.logprob_chunk": 32, "checkpoint.every": 100, "train.plot": False,
              "checkpoint.async_save": False}
    fields.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--config.{k}={v}" for k, v in fields.items()]


def launch(module: str, args, processes: int, devices: int | None, log_prefix, extra_env: dict | None = None):
    """Starts ``processes`` copies of ``python -m module args`` (``devices`` CPU devices each); with several,
    they are joined through a coordinator on a free local port. Output of process i goes to
    ``{log_prefix}.out{i}``. Returns the Popen objects."""
    cmd = [sys.executable, "-m", module, *args]
    env = cli_env(devices, extra_env)
    if processes == 1:
        return [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(f"{log_prefix}.out0", "w"),
                                 stderr=subprocess.STDOUT)]
    port = free_port()
    return [subprocess.Popen(cmd + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                                    f"--process_id={i}"], cwd=REPO, env=env,
                             stdout=open(f"{log_prefix}.out{i}", "w"), stderr=subprocess.STDOUT)
            for i in range(processes)]


def wait_all(procs, log_prefix, timeout=TIMEOUT, check: bool = True):
    """Waits for every process up to ``timeout`` s in all (then kills them all and fails); with ``check``,
    fails with the log tail of the first process that exited non-zero."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            pytest.fail(f"a process of the run {log_prefix} did not finish within {timeout} s")
    if check:
        for i, p in enumerate(procs):
            assert p.returncode == 0, open(f"{log_prefix}.out{i}").read()[-3000:]
    return [p.returncode for p in procs]


def simulated_hosts(P: int, fn, timeout: float = 120):
    """``[fn(p, allgather) for p in range(P)]`` with one thread per simulated host and a barrier-based
    ``allgather`` (stacks every host's array), as ``jax.experimental.multihost_utils.process_allgather``
    would on P processes. The first error of any host is raised; a host stuck in allgather fails the test."""
    barrier = threading.Barrier(P)
    slots, results, errors = [None] * P, [None] * P, []

    def allgather_for(p):
        def ag(x):
            slots[p] = np.asarray(x)
            barrier.wait()
            out = np.stack(slots)
            barrier.wait()
            return out
        return ag

    def run(p):
        try:
            results[p] = fn(p, allgather_for(p))
        except Exception as e:  # noqa: BLE001 - raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(P)]
    [t.start() for t in threads]
    [t.join(timeout) for t in threads]
    assert not any(t.is_alive() for t in threads), "a simulated host is stuck in allgather"
    if errors:
        raise errors[0]
    return results
