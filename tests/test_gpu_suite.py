"""bench/gpu_suite.sh plumbing: flags, the report from per-benchmark JSON, and a tiny dry run (slow)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_help_and_bad_flag():
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--tiny" in out.stdout and "--peak_tflops" in out.stdout
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown flag --nope" in bad.stderr


def test_report_from_json(tmp_path):
    side = lambda s, tok: {"median_s": s, "tokens_per_s": tok, "mfu": tok / 1e4}
    setting = {"prompt": 1200, "response": 420, "groups": 1, "length": 2000, "padded_tokens": 8000,
               "shared_prompt_padded_tokens": 5400, "share_prompt": False}
    json.dump({"results": [{"setting": setting, "ours": side(1.0, 4000.0), "torch": side(3.0, 1000.0)}]},
              open(tmp_path / "train.json", "w"))
    json.dump({"results": [{"setting": dict(setting, share_prompt=True), "ours": side(0.7, 5700.0)}]},
              open(tmp_path / "train_share.json", "w"))
    json.dump({"config": {"prompt_len": 512, "new_tokens": 256, "device": "NVIDIA H200"},
               "ours": {"64": {"decode_tok_s": 3000.0, "decode_step_ms": 21.0, "prefill_tok_s": 50000.0}},
               "roofline": {"64": {"roofline_fraction": 0.65}}}, open(tmp_path / "sampler.json", "w"))
    (tmp_path / "status.txt").write_text("== train: x\ntrain rc=0 seconds=10\ntrain_long rc=124 seconds=900\n")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite_report.py"), str(tmp_path)],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "suite.md").read_text()
    assert "4.00x (target >= 2x)" in md  # 4000 / 1000 tokens/s
    assert "MFU 40.0%" in md and "HBM roofline 65.0%" in md
    assert "5400 vs 8000 unpacked (32% fewer)" in md
    assert "train_long rc=124" in md and "no result" in md  # missing rl / load / train_long are reported
    data = json.load(open(tmp_path / "suite.json"))
    assert data["meta"]["device"] == "NVIDIA H200" and data["meta"]["status"]["train"]["rc"] == "0"


@pytest.mark.slow
@pytest.mark.heavy
def test_tiny_dry_run(tmp_path):
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path),
                          "--only", "train_share,sampler"], capture_output=True, text=True, env=_env(), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    status = (tmp_path / "status.txt").read_text()
    assert "train_share rc=0" in status and "sampler rc=0" in status, status
    md = (tmp_path / "suite.md").read_text()
    assert "(shared prompts)" in md and "decode" in md
