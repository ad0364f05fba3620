"""Several processes (hosts) in one run: when to call ``jax.distributed.initialize()``, and a guard for
tools that run on one host only.

JAX detects TPU pods, SLURM and Open MPI jobs by itself (``jax._src.clusters``); anywhere else a run is
joined explicitly with a coordinator address (process 0's ``host:port``), the number of processes and
this process's index. Nothing here imports a backend, so it can run before the first JAX computation.
"""
from __future__ import annotations

import os


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX's own detection finds (TPU pod, SLURM, Open MPI, ...), or None."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - private module moved
        return None
    for env in ClusterEnv._cluster_types:
        try:
            if not env.opt_in_only_method and env.is_env_present():
                return env.__name__
        except Exception:  # a probe that cannot run here (e.g. no metadata server) is no cluster
            continue
    return None


def maybe_init_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """``jax.distributed.initialize()`` before any other JAX call; returns whether it was called.

    ``auto``: when JAX detects a cluster (:func:`detected_cluster`) or a coordinator is given (argument or
    ``JAX_COORDINATOR_ADDRESS``); ``on``: always; ``off``: never (single process).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed={mode!r}: must be auto, on or off")
    if mode == "off":
        return False
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if mode == "auto" and not coordinator_address and detected_cluster() is None:
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        missing = [n for n, v in (("num_processes", num_processes), ("process_id", process_id)) if v is None]
        if detected_cluster() is None:
            raise ValueError(f"a coordinator address ({coordinator_address}) was given without {missing}: set "
                             "--num_processes and --process_id (config.num_processes / config.process_id) too")
    import jax

    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def planned_process_count() -> int:
    """How many processes the job this process belongs to has (1 outside a detected cluster), read from the
    environment without initializing JAX."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover
        return 1
    for env in ClusterEnv._cluster_types:
        try:
            if not env.opt_in_only_method and env.is_env_present():
                return int(env.get_process_count())
        except Exception:
            continue
    return 1


def require_single_process(tool: str) -> None:
    """Stop at once, with what to do instead, when ``tool`` (a one-host command: generation, evaluation)
    is started as one of several processes (a pod with ``--worker=all``, ``srun -n 2``, ``mpirun -n 2``)."""
    n = planned_process_count()
    if n > 1:
        raise SystemExit(f"error: {tool} runs on one host, but this process is one of {n} in a multi-process job "
                         "(TPU pod / SLURM / Open MPI). Run it on a single worker (e.g. gcloud ... ssh --worker=0, "
                         "srun -n 1); training (python -m iopo_jax.train) is the command that runs on every host.")
