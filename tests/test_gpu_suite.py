"""bench/gpu_suite.sh plumbing: flags, the dependency check, the report from per-benchmark JSON, and a tiny dry run
(heavy: ~4.5 min on 2 loaded cores)."""
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
    # a side that failed (e.g. out of memory) is shown as such, with the other side's figures
    json.dump({"results": [{"setting": setting, "ours": {"error": "RESOURCE_EXHAUSTED: out of memory"},
                            "torch": side(3.0, 1000.0)}]}, open(tmp_path / "train.json", "w"))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite_report.py"), str(tmp_path)],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "suite.md").read_text()
    assert "ours FAILED (RESOURCE_EXHAUSTED: out of memory); transformers+peft 3.000 s/step, 1000 tok/s" in md
    data = json.load(open(tmp_path / "suite.json"))
    assert data["meta"]["device"] == "NVIDIA H200" and data["meta"]["status"]["train"]["rc"] == "0"


def _deps():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_suite_deps

    return gpu_suite_deps


def test_deps_list_covers_every_third_party_import():
    """Every third-party module imported anywhere in the package or the suite's bench scripts is classified
    (required by the suite, or optional), so a new import cannot slip past the GPU machine's check."""
    import ast
    import glob

    deps = _deps()
    files = [f for pat in ("iopo_jax/**/*.py", "configs/*.py", "data_pipeline/*.py") for f in
             glob.glob(str(REPO / pat), recursive=True)]
    files += [str(REPO / "bench" / f) for f in ("train_step.py", "sampling.py", "rl_step.py", "load_checkpoint.py")]
    ours = {"iopo_jax", "configs", "data_pipeline", "evaluation", "bench", "__future__"}
    ours |= {p.stem for p in (REPO / "bench").glob("*.py")}  # bench scripts import their helpers (bench/peak.py)
    found = {}
    for f in files:
        for node in ast.walk(ast.parse(open(f, encoding="utf-8").read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    found.setdefault(top, f)
    assert len(found) > 10  # the scan works
    unknown = {m: f for m, f in found.items() if m not in deps.REQUIRED and m not in deps.OPTIONAL}
    assert not unknown, f"classify these in bench/gpu_suite_deps.py (REQUIRED or OPTIONAL): {unknown}"
    # what the suite's entry modules import at module level is required, not optional
    for m in ("ml_collections", "optax", "orbax", "flax", "ml_dtypes", "peft", "absl"):
        assert m in deps.REQUIRED


def test_deps_check_reports_missing_with_the_carry_commands(tmp_path):
    deps = _deps()
    res = deps.check(["no_such_module_iopo_xyz"], imports=False)
    assert res["missing_required"] == ["no_such_module_iopo_xyz"] and not res["ok"]
    assert all(r["found"] for r in res["modules"] if r["module"] in ("jax", "flax", "numpy"))
    text = deps.report(res)
    assert "MISSING (required): no_such_module_iopo_xyz" in text and "dependency check: FAILED" in text
    assert "pip download --only-binary=:all: --python-version" in text
    assert "pip install --no-index --find-links wheels no_such_module_iopo_xyz" in text
    ok = deps.check([], imports=False)
    assert ok["ok"] and "dependency check: OK" in deps.report(ok)
    # the command line: exit code 1 and the pip names alone
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite_deps.py"), "--no_imports", "--pip_names"],
                         capture_output=True, text=True, env=dict(_env(), IOPO_SUITE_EXTRA_DEPS="no_such_module_iopo_xyz"))
    assert out.returncode == 1 and out.stdout.strip() == "no_such_module_iopo_xyz", out.stderr


def test_wheels_installs_only_the_missing_and_stops_when_it_cannot(tmp_path):
    """--wheels DIR: pip install --no-index --find-links DIR of the missing required packages only; a package
    that is not among the carried wheels stops the suite (exit 3) before any benchmark."""
    (tmp_path / "wheels").mkdir()
    env = dict(_env(), IOPO_SUITE_EXTRA_DEPS="no_such_module_iopo_xyz")
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path / "out"),
                          "--wheels", str(tmp_path / "wheels")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "carried wheels" in out.stdout and "no_such_module_iopo_xyz" in out.stdout
    assert "pip install from" in out.stderr and not (tmp_path / "out" / "train.log").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_tiny_dry_run(tmp_path):
    """deps + train_share + sampler of `gpu_suite.sh --tiny`: 273 s on 2 cores at load average ~12 (83 s of CPU
    time), so heavy; `bash bench/gpu_suite.sh --tiny` runs every step (~12 min here)."""
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path),
                          "--only", "train_share,sampler"], capture_output=True, text=True, env=_env(), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    status = (tmp_path / "status.txt").read_text()
    assert "deps rc=0" in status and "train_share rc=0" in status and "sampler rc=0" in status, status
    md = (tmp_path / "suite.md").read_text()
    assert "(shared prompts)" in md and "decode" in md and "| dependencies (Python" in md and "| OK |" in md
    assert json.load(open(tmp_path / "train_share.json"))["results"][0]["ours"]["median_s"] > 0
