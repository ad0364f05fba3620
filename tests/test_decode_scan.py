"""The cached (sampling) forward: one scanned layer body over stacked weights and a stacked KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models import ModelConfig, Transformer
from iopo_jax.models import transformer as tlib
from iopo_jax.sampling import Sampler, SamplingParams
from iopo_jax.sampling.engine import DecodeState
from iopo_jax.sampling.params import Row

LAYERS = 4


def _model(layers=LAYERS):
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=128, attention_bias=True)
    return Transformer(cfg, rngs=nnx.Rngs(3))


def test_cached_forward_traces_the_layer_once_and_matches_no_cache(monkeypatch):
    model = _model()
    calls = []
    orig = tlib.DecoderLayer.__call__

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(tlib.DecoderLayer, "__call__", counting)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)), jnp.int32)

    stack = tlib.stack_state(nnx.split(model)[1]).layers

    def cached(model, ids, stack):
        cache = tlib.KVCache.init(model.config, 2, 16)
        h1, cache = model(ids[:, :8], cache=cache, layer_stack=stack)  # prompt, then 4 single-token steps
        hs = [h1]
        for i in range(8, 12):
            h, cache = model(ids[:, i:i + 1], jnp.full((2, 1), i, jnp.int32), cache=cache, layer_stack=stack)
            hs.append(h)
        return jnp.concatenate(hs, axis=1), cache

    h_scan, cache = nnx.jit(cached)(model, ids, stack)
    assert len(calls) == 5  # one traced layer per forward (5 forwards), not LAYERS per forward
    assert cache.k.shape == (LAYERS, 2, 16, 2, 8) and int(cache.end) == 12
    calls.clear()
    h_unrolled, cache_u = nnx.jit(cached)(model, ids, None)
    assert len(calls) == 5 * LAYERS
    np.testing.assert_allclose(np.asarray(cache_u.k), np.asarray(cache.k), rtol=2e-5, atol=2e-5)
    calls.clear()
    h_full, _ = nnx.jit(lambda m, x: m(x))(model, ids)
    assert len(calls) == LAYERS  # the no-cache path (scan_layers off) is per layer
    np.testing.assert_allclose(np.asarray(h_scan), np.asarray(h_full), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(h_unrolled), np.asarray(h_full), rtol=2e-4, atol=2e-4)


def test_sampler_stacks_weights_once_and_decode_does_not_restack():
    model = _model()
    sampler = Sampler(model, None, eos_token_ids=[], prompt_buckets=(16,), new_token_buckets=(16,),
                      batch_buckets=(2,), max_batch_size=2, max_model_len=32, continuous=False)
    st = sampler.state
    assert isinstance(st, tlib.StackedState)
    q = st.layers["self_attn"]["q_proj"]["weight"][...]
    np.testing.assert_array_equal(np.asarray(q[2]), np.asarray(model.layers[2].self_attn.q_proj.weight[...]))
    assert sampler.engine.prepare(st) is st  # a stacked state is used as it is (shared between samplers)

    # the decode program takes the stacked weights as they are: no concatenation of per-layer weights
    eng = sampler.engine
    b, s, n = 2, 32, 16
    cache = tlib.KVCache.init(model.config, b, s)
    ds = DecodeState(cache, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n)), jnp.zeros((b,), jnp.int32),
                     jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32), jnp.zeros((b,), bool),
                     jnp.zeros((b,), jnp.int32), jnp.ones((), jnp.int32))
    rows = [Row([1, 2], SamplingParams(max_new_tokens=4), 0) for _ in range(b)]
    rp = sampler._row_params(rows, b)
    jaxpr = jax.make_jaxpr(lambda st, ds, rp: eng._decode(st, ds, rp, jnp.int32(n)))(st, ds, rp)

    def eqns(jx):
        for e in jx.eqns:
            yield e
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        yield from eqns(getattr(inner, "jaxpr", inner))

    stacks = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "concatenate" and len(e.invars) == LAYERS]
    assert not stacks, f"decode stacks per-layer arrays: {stacks[:1]}"

    # new weights: outputs follow them, nothing recompiles
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    before = [c.token_ids for c in sampler.generate(prompts, params)]
    counts = sampler.trace_counts
    other = _model()
    _, ostate = nnx.split(other)
    ostate = jax.tree_util.tree_map(lambda x: x * 1.7, ostate)
    sampler.update_model(ostate)
    after = [c.token_ids for c in sampler.generate(prompts, params)]
    assert sampler.trace_counts == counts
    assert after != before
    nnx.update(other, ostate)
    ref = Sampler(other, None, eos_token_ids=[], prompt_buckets=(16,), new_token_buckets=(16,), batch_buckets=(2,),
                  max_batch_size=2, max_model_len=32, continuous=False, scan_layers=False)  # unrolled layers
    assert not isinstance(ref.state, tlib.StackedState)
    assert [c.token_ids for c in ref.generate(prompts, params)] == after
