"""The AOT TPU compile check (iopo_jax.tools.aot_compile): topology names, config resolution, and the
tool itself compiling a tiny model for a 4-chip v4 slice (needs libtpu: pip install "jax[tpu]")."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from iopo_jax.tools import aot_compile as aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason="libtpu is not installed (pip install \"jax[tpu]\"); it compiles for TPU on CPU")


@pytest.mark.parametrize("name,topology,chips,hbm,chip_config", [
    ("v4-32", "v4:2x2x4", 16, 32, "megacore"),
    ("v4-8", "v4:2x2x1", 4, 32, "megacore"),
    ("v5e-8", "v5e:2x4", 8, 16, "default"),
    ("v5litepod-16", "v5e:4x4", 16, 16, "default"),
    ("v5p-128", "v5p:4x4x4", 64, 95, "megacore"),
    ("v6e-64", "v6e:8x8", 64, 32, "default"),
    ("v4:2x2x1", "v4:2x2x1", 4, 32, "megacore"),
    ("V6E:2x4", "v6e:2x4", 8, 32, "default"),
])
def test_topology_names(name, topology, chips, hbm, chip_config):
    t = aot.parse_topology(name)
    assert (t.topology_name, t.num_chips, t.hbm_bytes, t.chip_config) == (topology, chips, hbm * GiB, chip_config)


@pytest.mark.parametrize("bad,why", [("v4-31", "multiple of 2"), ("v7-8", "unknown TPU generation"),
                                     ("tpu", "expected a slice name"), ("v4:2x4", "3-D"),
                                     ("v5e-12", "no known chip grid")])
def test_topology_errors(bad, why):
    with pytest.raises(ValueError, match=why):
        aot.parse_topology(bad)


def test_hbm_override():
    assert aot.parse_topology("v5e-4", hbm_gib=0.5).hbm_bytes == GiB // 2


def test_fit_arithmetic():
    r = aot.Result("p", "", argument=10, output=4, alias=3, temp=5, code=1, resident=7, flops=1.0, per_step=1,
                   compile_s=0.0)
    assert r.total == 10 + 4 - 3 + 5 + 1 + 7
    t = aot.parse_topology("v4-8")
    assert "| yes |" in aot.table([r], t, usable=24)
    assert "**NO**" in aot.table([r], t, usable=23)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*tpu*.py"))))
def test_shipped_tpu_configs_resolve(path):
    """Every TPU config loads and its model architecture is known offline (no download)."""
    cfg = aot.load_config(path, [])
    mcfg, where = aot.model_config(cfg)
    assert mcfg.num_params > 5e9, (path, where)
    assert mcfg.lora is not None and mcfg.param_dtype == "bfloat16"


def test_set_overrides_and_errors():
    cfg = aot.load_config(os.path.join(REPO, "configs", "tpu_v4.py"), ["data.batch_size=32", "model.remat=none",
                                                                        "optimizer.lr=1"])
    assert (cfg.data.batch_size, cfg.model.remat, cfg.optimizer.lr) == (32, "none", 1.0)
    with pytest.raises(KeyError, match="no field 'data.nope'"):
        aot.load_config(os.path.join(REPO, "configs", "tpu_v4.py"), ["data.nope=1"])


TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, hidden_act="silu", rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=1024)


def _run_tool(tmp_path, *extra, config="configs/cpu_demo.py"):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "aot.json"
    sets = ["--set", "data.cutoff_len=128", "--set", "data.bucket_step=64", "--set", "data.batch_size=4"]
    cmd = [sys.executable, "-m", "iopo_jax.tools.aot_compile", f"--config={config}", "--topology=v4:2x2x1",
           f"--model_config={tmp_path}", f"--json={out}", *(sets if "demo" in config and "segpo" not in config else []),
           *extra]
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return p, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
@needs_libtpu
def test_aot_no_fit_exits_nonzero(tmp_path):
    """A program bigger than the chip's (overridden) HBM: exit status 1 and a message naming it."""
    p, res = _run_tool(tmp_path, "--programs=apply_step", "--hbm_gib=0.000001", "--hbm_fraction=1")
    assert p.returncode == 1, p.stderr[-3000:]
    assert res["fits"] is False and [r["name"] for r in res["programs"]] == ["apply_step"]
    assert res["programs"][0]["total"] > 0.000001 * GiB
    assert "DOES NOT FIT: apply_step needs" in p.stderr


@needs_libtpu
@pytest.mark.slow
def test_aot_compile_fits_and_does_not_fit(tmp_path):
    p, res = _run_tool(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert res["fits"] and res["devices"] == 4 and res["topology"] == "v4:2x2x1"
    assert res["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    progs = {r["name"]: r for r in res["programs"]}
    assert set(progs) == {"micro_step", "apply_step"}
    micro = progs["micro_step"]
    assert micro["what"] == "16 rows x 128 tokens"  # 4 IOPO groups x 4 sequences, the largest bucket
    assert micro["argument"] > 0 and micro["temp"] > 0 and micro["flops"] > 0
    assert micro["resident"] > 0  # the optimizer state stays in HBM during the micro-step
    # Forward + backward of 16 x 128 tokens through the model: at least 6 * params * tokens / 4 chips
    # for the LoRA-free matmuls' lower bound of the vocabulary projection alone.
    assert micro["flops"] * 4 >= 2 * 16 * 128 * 512 * 32
    assert "| micro_step |" in p.stdout and "fits: every program fits" in p.stdout
    used = max(r["total"] for r in res["programs"])

    # The same programs against a chip whose HBM is smaller than what they need: exit 1, named.
    small = used / 2 / GiB
    p2, res2 = _run_tool(tmp_path, f"--hbm_gib={small}", "--hbm_fraction=1")
    assert p2.returncode == 1, p2.stderr[-3000:]
    assert res2["fits"] is False
    assert "DOES NOT FIT" in p2.stderr and "per chip" in p2.stderr


@needs_libtpu
@pytest.mark.slow
@pytest.mark.heavy
def test_aot_compile_rl_config(tmp_path):
    """An RL config: the learner's grad step and the sampler's prefill and decode compile for the slice."""
    p, res = _run_tool(tmp_path, "--programs=grad_step,prefill,decode", config="configs/segpo_demo.py")
    assert p.returncode == 0, p.stderr[-3000:]
    progs = {r["name"]: r for r in res["programs"]}
    assert set(progs) == {"grad_step", "prefill", "decode"}
    assert all(r["argument"] > 0 for r in progs.values()) and progs["grad_step"]["flops"] > 0
    # the sampler's loops (chunks, tokens, layers) are counted once by XLA: no FLOPs claimed for them
    assert all(math.isnan(progs[k]["flops"]) for k in ("prefill", "decode"))
    assert "FLOPs of ['prefill', 'decode'] not given" in p.stdout + p.stderr
    assert progs["decode"]["alias"] > 0  # the decode state (KV cache) is donated and updated in place


def test_missing_libtpu_or_bad_topology_is_a_usage_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "iopo_jax.tools.aot_compile", "--config=configs/tpu_v4.py",
                        "--topology=v9-8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert ("unknown TPU generation" in p.stderr) or ("libtpu is not installed" in p.stderr)


def test_compiler_out_of_memory_is_a_no_fit():
    """libtpu refuses a program that cannot fit; the tool reads the size it reports (exit 1, not a crash)."""
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(35.36G) exceeds available HBM (30.75G).")
    assert aot.compiler_oom(msg) == int(35.36 * GiB)
    assert aot.compiler_oom("INVALID_ARGUMENT: unrelated") is None
    r = aot.Result("micro_step", "", 0, 0, 0, aot.compiler_oom(msg), 0, 0, float("nan"), 1, 0.0, note="oom")
    assert "**NO**" in aot.table([r], aot.parse_topology("v4-32"), usable=10 * (1 << 40))


@needs_libtpu
@pytest.mark.slow
def test_aot_flops_count_every_scanned_layer(tmp_path):
    """With model.scan_layers=True the compiled program holds one layer body in a loop, which XLA's cost
    analysis counts once; the tool reports the FLOPs of the unrolled lowering instead, so both settings give
    the same count (and the scanned count grows with the number of layers)."""
    flops = {}
    for layers in (1, 3):
        for scan in (False, True):
            d = tmp_path / f"{layers}_{scan}"
            d.mkdir()
            (d / "config.json").write_text(json.dumps(dict(TINY, num_hidden_layers=layers)))
            out = d / "aot.json"
            cmd = [sys.executable, "-m", "iopo_jax.tools.aot_compile", "--config=configs/cpu_demo.py",
                   "--topology=v4:2x2x1", f"--model_config={d}", f"--json={out}", "--programs=micro_step",
                   "--set", "data.cutoff_len=128", "--set", "data.bucket_step=64", "--set", "data.batch_size=4",
                   "--set", f"model.scan_layers={scan}"]
            env = dict(os.environ, PYTHONPATH=REPO)
            env.pop("XLA_FLAGS", None)
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, p.stderr[-3000:]
            flops[layers, scan] = json.loads(out.read_text())["programs"][0]["flops"]
    for layers in (1, 3):
        # unrolled lowering (whole program / chips) vs compiled per-chip count: measured 2.3% apart
        assert flops[layers, True] == pytest.approx(flops[layers, False], rel=0.05), flops
    assert flops[3, True] > 1.5 * flops[1, True], flops
