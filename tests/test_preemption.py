"""SIGTERM (TPU VM / Kubernetes / SLURM preemption): the CLI saves a checkpoint at the next step boundary
and exits cleanly; rerunning resumes and ends with the adapter of an uninterrupted run, bit for bit."""
import os
import signal
import subprocess
import sys
import time

import pytest

from test_trainer import _cli, cli_env, small_iopo_file  # noqa: F401  (fixture)

from conftest import REPO
from procs import tiny_train_args


def _args(model_dir, data_file):
    return tiny_train_args(model_dir, data_file)


def _train_lines(path):
    return sum(1 for line in open(path) if '"train"' in line) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.heavy
def test_sigterm_saves_and_resumes_exactly(tiny_model_dir, small_iopo_file, tmp_path):  # noqa: F811
    args = _args(tiny_model_dir, small_iopo_file)
    full = _cli(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    total = _train_lines(tmp_path / "full" / "metrics.jsonl")
    assert total >= 4

    wd = tmp_path / "term"
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={wd}", "--noprogress", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.time() + 600
    while time.time() < deadline and _train_lines(wd / "metrics.jsonl") < 2 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted (SIGTERM)" in out, out
    saved = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
    # checkpoint.every=100: the only checkpoint is the one the SIGTERM asked for, before the end
    assert saved and saved[-1] < total, saved
    assert not (wd / "export").exists()  # nothing exported from an unfinished run

    again = _cli(wd, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {saved[-1]}" in again.stderr
    a = open(tmp_path / "full" / "export" / "adapter" / "adapter_model.safetensors", "rb").read()
    b = open(wd / "export" / "adapter" / "adapter_model.safetensors", "rb").read()
    assert a == b
