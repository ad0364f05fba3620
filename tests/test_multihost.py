"""When ``jax.distributed.initialize()`` is called (JAX's cluster detection or an explicit coordinator), and
one-host tools stopping at once, with a clear message, when started as one of several processes."""
import subprocess
import sys

import jax
import pytest

from iopo_jax import multihost
from iopo_jax.multihost import maybe_init_distributed, planned_process_count, require_single_process

from conftest import REPO

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
                "OMPI_MCA_ess_base_jobid", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "PMIX_NAMESPACE")


@pytest.fixture
def calls(monkeypatch):
    for v in CLUSTER_VARS:
        monkeypatch.delenv(v, raising=False)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_single_process_without_cluster_or_coordinator(calls, monkeypatch):
    monkeypatch.setattr(multihost, "detected_cluster", lambda: None)
    assert maybe_init_distributed("auto") is False
    assert maybe_init_distributed("off", "127.0.0.1:1234", 2, 0) is False
    assert calls == []
    with pytest.raises(ValueError, match="config.distributed='maybe'"):
        maybe_init_distributed("maybe")


def test_explicit_coordinator(calls, monkeypatch):
    monkeypatch.setattr(multihost, "detected_cluster", lambda: None)
    assert maybe_init_distributed("auto", "127.0.0.1:1234", 2, 1) is True
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    with pytest.raises(ValueError, match=r"without \['num_processes', 'process_id'\]"):
        maybe_init_distributed("auto", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:8476")
    assert maybe_init_distributed("auto", None, 4, 3) is True
    assert calls[-1]["coordinator_address"] == "10.0.0.1:8476"


def test_slurm_detected_by_jax(calls, monkeypatch):
    """JAX's own SLURM detection makes ``auto`` initialize (a TPU pod or Open MPI job works the same way)."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert multihost.detected_cluster() == "SlurmCluster"
    assert planned_process_count() == 4
    assert maybe_init_distributed("auto") is True
    assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


def test_one_host_tools_refuse_several_processes(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(multihost, "planned_process_count", lambda: 2)
    with pytest.raises(SystemExit, match="runs on one host.*one of 2"):
        require_single_process("python -m iopo_jax.sampling.generate")
    monkeypatch.setattr(multihost, "planned_process_count", lambda: 1)
    require_single_process("python -m iopo_jax.sampling.generate")  # one process: nothing happens


CLUSTERS = {  # what srun -n 2 / mpirun -n 2 put in each process's environment (rank {i})
    "slurm": {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "{i}", "SLURM_STEP_NODELIST": "node1",
              "SLURM_LOCALID": "{i}"},
    "openmpi": {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_RANK": "{i}", "OMPI_COMM_WORLD_LOCAL_RANK": "{i}"},
}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
@pytest.mark.parametrize("tool", ["generate", "evaluation"])
def test_generation_and_evaluation_clis_stop_at_once_as_two_processes(tool, cluster, tmp_path):
    """Both ranks of a 2-process job (srun -n 2 / mpirun -n 2) stop at once with the message, write nothing,
    and neither waits for the other (each has a deadline; a hang fails the test)."""
    out = tmp_path / "out.jsonl"
    cmd = {"generate": ["-m", "iopo_jax.sampling.generate", f"--model_dir={tmp_path}", f"--input={tmp_path / 'in.jsonl'}",
                        f"--output={out}"],
           "evaluation": ["-m", "evaluation.run", "--config=configs/eval_demo.py",
                          "--config.generation.backend=reference", f"--workdir={tmp_path / 'eval'}"]}[tool]
    ps = []
    for i in range(2):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)}
        env.update({k: v.format(i=i) for k, v in CLUSTERS[cluster].items()})
        ps.append(subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in ps]
    finally:
        for p in ps:
            p.kill()
            p.wait()
    for p, (_, err) in zip(ps, results):
        assert p.returncode != 0
        assert "runs on one host" in err and "one of 2" in err, err[-2000:]
    assert not out.exists() and not (tmp_path / "eval").exists()
