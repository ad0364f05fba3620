"""The C++ decode-attention kernel for XLA:CPU (iopo_jax.models.cpu_attention): same attention as the
einsums, used by the cached forward on CPU with attention_impl=auto, off with xla or the environment switch."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models import ModelConfig, Transformer
from iopo_jax.models import cpu_attention
from iopo_jax.models import transformer as tlib
from iopo_jax.sampling import Sampler, SamplingParams

if cpu_attention._compiler() is None:
    pytest.skip("no C++ compiler on this machine: the kernel cannot be built (the einsum path runs)",
                allow_module_level=True)


def _case(seed, b, t, n, kh, h, s, layers, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(layers, b, s, kh, h)), dtype)
    v = jnp.asarray(rng.normal(size=(layers, b, s, kh, h)), dtype)
    ends = rng.integers(1, s - t, size=b)
    slots = np.arange(s)
    mask = (slots[None, None, :] <= (ends[:, None] + np.arange(t)[None, :])[:, :, None]) & (rng.random((b, 1, s)) > 0.2)
    mask[0] = False  # a row that sees nothing (padding): zeros
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("shape,dtype,tol", [
    ((4, 1, 9, 3, 64, 37, 3), jnp.float32, 2e-6),    # SmolLM2's heads, one decode token, layer 2 of 3
    ((3, 3, 4, 2, 16, 20, 1), jnp.float32, 2e-6),    # three new tokens (causal within them)
    ((5, 1, 14, 2, 64, 50, 2), jnp.bfloat16, 2e-2),  # Qwen2-0.5B's heads in bfloat16
])
def test_kernel_matches_einsum_attention(shape, dtype, tol):
    ok, reason = cpu_attention.status()
    assert ok, reason  # a compiler is present, so the kernel must build
    b, t, n, kh, h, s, layers = shape
    q, k, v, mask = _case(0, *shape, dtype)
    layer = layers - 1
    got = jax.jit(cpu_attention.decode_attention)(q, k, v, layer, mask)
    ref = tlib.attend(q, k[layer], v[layer], mask, "xla")
    assert got.shape == (b, t, n * h) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got[1:], np.float32), np.asarray(ref[1:], np.float32), atol=tol, rtol=tol)
    assert float(jnp.abs(got[0]).max()) == 0.0
    # another layer of the same stack gives that layer's attention (the index is read at run time)
    other = jax.jit(cpu_attention.decode_attention)(q, k, v, 0, mask)
    ref0 = tlib.attend(q, k[0], v[0], mask, "xla")
    np.testing.assert_allclose(np.asarray(other[1:], np.float32), np.asarray(ref0[1:], np.float32), atol=tol, rtol=tol)


def _model(impl="auto"):
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=128, attention_bias=True,
                      attention_impl=impl)
    return Transformer(cfg, rngs=nnx.Rngs(5))


def _decode_jaxpr(model):
    cache = tlib.KVCache.init(model.config, 2, 16)
    ids = jnp.zeros((2, 1), jnp.int32)
    return str(jax.make_jaxpr(lambda c: nnx.merge(*nnx.split(model))(ids, cache=c)[0])(cache))


def test_cached_forward_uses_the_kernel_on_cpu_with_auto_only():
    assert "iopo_cpu_decode_attention" in _decode_jaxpr(_model("auto"))
    assert "iopo_cpu_decode_attention" not in _decode_jaxpr(_model("xla"))


@pytest.mark.parametrize("continuous", [True, False])
def test_sampler_greedy_tokens_same_with_kernel_and_einsum(continuous):
    prompts = [[3, 17, 29, 4], [8, 8, 100, 7, 1, 9, 12], [200]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0)
    outs = {}
    for impl in ("auto", "xla"):
        sampler = Sampler(_model(impl), None, eos_token_ids=[], max_model_len=32, continuous=continuous)
        outs[impl] = [c.token_ids for c in sampler.generate(prompts, params)]
    assert outs["auto"] == outs["xla"]
    assert all(len(t) == 12 for t in outs["auto"])


def test_switch_off_and_missing_compiler_fall_back_with_a_reason(monkeypatch, tmp_path):
    saved = dict(cpu_attention._STATE)
    try:
        cpu_attention._STATE.clear()
        monkeypatch.setenv("IOPO_JAX_CPU_KERNELS", "0")
        assert cpu_attention.status() == (False, "disabled by IOPO_JAX_CPU_KERNELS")
        assert "iopo_cpu_decode_attention" not in _decode_jaxpr(_model("auto"))

        cpu_attention._STATE.clear()
        monkeypatch.delenv("IOPO_JAX_CPU_KERNELS")
        monkeypatch.setenv("IOPO_JAX_CACHE", str(tmp_path))  # nothing built there
        monkeypatch.setattr(shutil, "which", lambda name: None)
        monkeypatch.delenv("CXX", raising=False)
        ok, reason = cpu_attention.status()
        assert not ok and "no C++ compiler" in reason
    finally:
        cpu_attention._STATE.clear()
        cpu_attention._STATE.update(saved)


def _run_bench(args, tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable] + args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_decode_attention_times_the_kernel_next_to_the_einsums(tmp_path):
    out = _run_bench(["bench/decode_attention.py", "--batch=3", "--cache_len=24", "--layers=2", "--repeats=1"], tmp_path)
    assert "kernel: compiled kernel" in out
    row = [line for line in out.splitlines() if line.strip().startswith("3 ")][0].split("|")
    kernel_ms, diff = float(row[2].split()[0]), float(row[-1])
    assert kernel_ms > 0 and diff < 1e-5


def test_bench_sampling_runs_an_engine_with_and_without_the_kernel(tmp_path):
    import json

    js = tmp_path / "s.json"
    _run_bench(["bench/sampling.py", "--engines=static,static:xla", "--batch_sizes=2", "--skip_hf", "--new_tokens=4",
                "--prompt_len=8", "--repeats=1", "--nomatmul_peak", f"--json_out={js}"], tmp_path)
    engines = json.loads(js.read_text())["engines"]
    assert set(engines) == {"static", "static:xla"}
    for res in engines.values():
        assert res["2"]["same_rows"] == 2 and res["2"]["decode_tok_s"] > 0


def test_bench_sampling_puts_the_step_next_to_the_peak_and_the_dense_chain(tmp_path):
    import json

    js = tmp_path / "s.json"
    out = _run_bench(["bench/sampling.py", "--engines=static", "--batch_sizes=2", "--skip_hf", "--new_tokens=4",
                      "--prompt_len=8", "--repeats=1", "--peak_sizes=64", f"--json_out={js}"], tmp_path)
    res = json.loads(js.read_text())
    assert res["config"]["layer_loop"] == "unrolled"  # --scan_layers=auto on CPU
    peak, chain = res["matmul_peak"], res["dense_chain"]["2"]
    assert peak["gflops"] > 0 and chain["step_ms"] > 0
    assert abs(chain["fraction"] - chain["gflops"] / peak["gflops"]) < 1e-9
    step = res["engines"]["static"]["2"]
    assert abs(peak["decode"]["static/2"]["gflops"] - step["decode_tok_s"] * peak["decode_flops_per_token"] / 1e9) < 1e-6
    assert "of the dense chain's speed" in out
