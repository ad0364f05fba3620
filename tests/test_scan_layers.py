"""Scanned layers: the same logits and gradients as the layer loop, with and without remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models.config import LoRAConfig, ModelConfig
from iopo_jax.models.transformer import Transformer


def _loss_and_grads(scan, remat):
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=8, attention_impl="xla", remat=remat, scan_layers=scan, lora=LoRAConfig(rank=4))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # non-zero LoRA B so that the LoRA gradients depend on every layer
    for layer in model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.lora_b[...] = jnp.full(lin.lora_b.shape, 0.05)
    graph, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 61)
    seg = jnp.asarray(np.r_[[1] * 24, [1] * 15 + [0] * 9].reshape(2, 24))
    w = jax.random.normal(jax.random.key(2), (2, 24, 61))

    def loss(lora):
        m = nnx.merge(graph, lora, rest)
        hidden, _ = m(ids, None, seg)
        return jnp.sum(m.logits(hidden) * w * seg[:, :, None]), hidden

    (val, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    return np.asarray(hidden), jax.tree_util.tree_leaves(grads)


@pytest.mark.parametrize("remat", ["none", "full", pytest.param("dots", marks=pytest.mark.slow)])
def test_scan_equals_loop(remat):
    h_loop, g_loop = _loss_and_grads(False, remat)
    h_scan, g_scan = _loss_and_grads(True, remat)
    np.testing.assert_allclose(h_scan, h_loop, rtol=1e-5, atol=1e-5)
    assert len(g_loop) == len(g_scan) and len(g_loop) > 0
    scale = max(float(np.abs(np.asarray(g)).max()) for g in g_loop)
    assert scale > 1e-3
    for a, b in zip(g_scan, g_loop):  # float32 sums in another order: compare relative to the largest gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6 * scale)


def test_scan_keeps_the_parameter_tree():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=8)
    a = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    b = nnx.state(Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)), nnx.Param)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]  # same paths: same checkpoints and HF weight map
