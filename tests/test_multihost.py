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
        require_single_process("python -m iopo_jax.generate")
    monkeypatch.setattr(multihost, "planned_process_count", lambda: 1)
    require_single_process("python -m iopo_jax.generate")  # one process: nothing happens


@pytest.mark.parametrize("cmd", [["-m", "iopo_jax.generate", "--model_dir=x", "--input=x", "--output=x"],
                                 ["-m", "evaluation.run", "--config=configs/eval_demo.py"]])
def test_generation_and_evaluation_clis_stop_at_once_under_srun(cmd, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path),
           "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "node1",
           "SLURM_LOCALID": "0"}
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "runs on one host" in r.stderr and "one of 2" in r.stderr, r.stderr[-2000:]
