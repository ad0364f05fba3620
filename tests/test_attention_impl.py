"""Attention by platform: splash (Pallas interpret mode on CPU), cuDNN-style sequence lengths, auto selection."""
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # TPU topology descriptions while others hold libtpu

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models import attention as A
from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import Transformer, attend
from iopo_jax.sharding import make_mesh, use_mesh

B, T, N, KH, H = 2, 128, 4, 2, 16


def _qkv(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, t, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, t, KH, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, t, KH, H), jnp.float32)
    return q, k, v


def _packed_segments(t=T):
    seg = np.zeros((B, t), np.int32)
    seg[0, :50], seg[0, 50:90], seg[0, 90:120] = 1, 2, 3  # three packed sequences + padding
    seg[1, :77] = 1  # one right-padded sequence
    return jnp.asarray(seg)


def _loss(fn, seg):
    real = (seg != 0)[:, :, None].astype(jnp.float32)
    w = jax.random.normal(jax.random.key(9), (B, seg.shape[1], N * H))
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w * real)


@pytest.mark.slow  # Pallas interpret mode: ~1 min on a loaded 2-core machine
def test_splash_interpret_matches_reference_outputs_and_grads():
    q, k, v = _qkv()
    seg = _packed_segments()
    mask = A.SegmentMask(seg)
    ref = lambda q, k, v: attend(q, k, v, mask.dense(), "xla")
    spl = lambda q, k, v: A.splash_attention(q, k, v, seg, interpret=True)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(spl(q, k, v))[real], np.asarray(ref(q, k, v))[real], atol=2e-5, rtol=2e-5)
    g_ref = jax.grad(_loss(ref, seg), argnums=(0, 1, 2))(q, k, v)
    g_spl = jax.grad(_loss(spl, seg), argnums=(0, 1, 2))(q, k, v)
    for a, b, name in zip(g_spl, g_ref, "qkv"):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
        assert np.abs(np.asarray(b)[real]).max() > 1e-3  # the gradient is not trivially zero


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_splash_under_a_mesh_runs_per_shard():
    q, k, v = _qkv(1)
    seg = _packed_segments()
    ref = attend(q, k, v, A.SegmentMask(seg).dense(), "xla")
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    with use_mesh(mesh):
        out = jax.jit(lambda q, k, v, s: A.splash_attention(q, k, v, s, interpret=True))(q, k, v, seg)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5, rtol=2e-5)


def test_lengths_attention_xla_matches_reference():
    """The call the GPU path makes (causal + sequence lengths, no dense mask), with implementation=xla."""
    q, k, v = _qkv(2, t=40)
    lengths = jnp.array([40, 23], jnp.int32)
    seg = (jnp.arange(40)[None] < lengths[:, None]).astype(jnp.int32)
    ref = jax.jit(lambda q, k, v: attend(q, k, v, A.SegmentMask(seg).dense(), "xla"))
    got = jax.jit(lambda q, k, v: A.lengths_attention(q, k, v, lengths, implementation="xla"))
    real = np.asarray(seg != 0)
    out = np.asarray(got(q, k, v))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], np.asarray(ref(q, k, v))[real], atol=2e-5, rtol=2e-5)
    g1 = jax.jit(jax.grad(_loss(got, seg), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(_loss(ref, seg), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_right_padded_detection():
    ok = lambda s: bool(A.right_padded_lengths(jnp.asarray(s, jnp.int32))[1])
    assert ok([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert not ok([[0, 1, 1, 1], [1, 1, 0, 0]])  # left padding
    assert not ok([[1, 1, 2, 2], [1, 1, 0, 0]])  # packed
    lengths = A.right_padded_lengths(jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]]))[0]
    assert lengths.tolist() == [3, 1]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU (CPU-only here)")
def test_cudnn_segment_path_matches_reference_on_gpu():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3))
    for seg in (jnp.asarray((np.arange(T)[None] < np.array([[T], [77]])).astype(np.int32)), _packed_segments()):
        mask = A.SegmentMask(seg)
        got = attend(q, k, v, mask, "cudnn")
        ref = attend(q, k, v, mask.dense(), "xla")
        real = np.asarray(seg != 0)
        np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(ref, np.float32)[real], atol=3e-2)


def test_resolve_impl(monkeypatch):
    seg = A.SegmentMask(jnp.ones((1, 256), jnp.int32))
    pre = A.SegmentMask(jnp.ones((1, 256), jnp.int32), jnp.zeros((1, 256), jnp.int32))
    assert A.platform() == "cpu"
    assert A.resolve_impl("auto", seg, 256) == "xla"  # CPU: the dense path (fastest at the lengths CPUs train)
    monkeypatch.setattr(A, "platform", lambda: "tpu")
    assert A.resolve_impl("auto", seg, 256) == "splash"
    assert A.resolve_impl("auto", seg, 200) == "chunked"  # not a multiple of 128
    assert A.resolve_impl("auto", pre, 256) == "chunked"  # prefix ids: dense mask
    assert A.resolve_impl("auto", jnp.ones((1, 1, 256), bool), 1) == "chunked"  # KV cache
    monkeypatch.setattr(A, "platform", lambda: "gpu")
    assert A.resolve_impl("auto", seg, 256) == "cudnn"
    assert A.resolve_impl("auto", pre, 256) == "cudnn_dense"


def test_platform_follows_the_mesh_devices_not_the_backend():
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc("v5e:2x2", "tpu")
    except Exception as e:  # no libtpu on this machine
        pytest.skip(f"no TPU topology description available ({type(e).__name__})")
    mesh = make_mesh({"fsdp": -1}, topo.devices)
    seg = A.SegmentMask(np.ones((4, 256), np.int32))
    with use_mesh(mesh):
        assert A.platform() == "tpu"
        assert A.resolve_impl("auto", seg, 256) == "splash"
    assert A.platform() == "cpu"


@pytest.mark.slow
def test_model_with_splash_matches_xla():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, attention_impl="xla")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, 97)
    seg = _packed_segments()
    pos = jnp.asarray(np.concatenate([[np.r_[np.arange(50), np.arange(40), np.arange(30), np.zeros(8)]],
                                      [np.r_[np.arange(77), np.zeros(51)]]]).astype(np.int32))
    ref, _ = model(ids, pos, seg)
    model.config = cfg.replace(attention_impl="splash")
    for layer in model.layers:
        layer.self_attn.impl = "splash"
    got, _ = model(ids, pos, seg)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=5e-5, rtol=5e-5)


def test_aot_lowering_for_a_tpu_topology_uses_splash():
    """Compiling ahead of time for TPU on a CPU host: the lowered model carries the splash kernel."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc("v5e:2x2", "tpu")
    except Exception as e:  # no libtpu on this machine
        pytest.skip(f"no TPU topology description available ({type(e).__name__})")
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = make_mesh({"fsdp": -1}, topo.devices)
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=128, dtype="bfloat16")
    graph, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), abstract=True))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
    state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)

    def loss(state, ids, seg):
        hidden, _ = nnx.merge(graph, state)(ids, None, seg)
        return hidden.astype(jnp.float32).sum()

    with use_mesh(mesh):
        text = jax.jit(jax.grad(loss)).lower(state, ids, ids).as_text()
    assert "tpu_custom_call" in text
