"""Flax NNX decoder-only transformer for Qwen2 / Qwen2.5 and Llama-3 / 3.1.

One file, whole and readable. Shapes use letters: b batch, t query length, s key length,
d model width, n query heads, k key/value heads, g = n // k query heads per kv head,
h head dim, f MLP width, v vocabulary.

Parameters are stored in ``param_dtype`` (fp32 by default) and cast to ``dtype`` for the
matmuls; RMSNorm statistics, RoPE tables, softmax and logits are float32.

Masking. Without a cache, ``segment_ids [b, t]`` decides who sees whom: token i attends to token
j <= i of the same non-zero segment (0 marks padding). This covers right padding, left padding
(segment ids = attention mask) and packed sequences (segment ids 1, 2, 3 ...). ``positions``
are the RoPE positions (restart at 0 for each packed segment; for left padding, count from the
first real token). With a :class:`KVCache` the new keys are written at slots
``[end, end + t)`` and a query at slot ``end + i`` sees every valid slot ``<= end + i``.

Example::

    cfg = ModelConfig.from_hf("/path/to/Qwen2-7B-Instruct")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hidden, _ = model(input_ids, positions, segment_ids)
    logits = model.logits(hidden)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from iopo_jax.models import attention as attn_lib
from iopo_jax.models import cpu_attention
from iopo_jax.models.config import ModelConfig
from iopo_jax.sharding import BATCH_AXES, constrain

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dt(name: str):
    return jnp.dtype(name)


class ParamInit:
    """Makes parameter values: random draws from ``rngs.params()``, or, when ``abstract``, only
    their shapes and dtypes (``jax.ShapeDtypeStruct``: nothing allocated, nothing drawn, nothing
    traced). Loading builds the abstract model and fills it from the checkpoint.
    ``rngs`` also feeds the dropout streams, which stay real in both modes.
    """

    def __init__(self, rngs: nnx.Rngs, abstract: bool = False):
        self.rngs = rngs
        self.abstract = abstract

    def normal(self, shape, dtype, std: float):
        if self.abstract:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.random.normal(self.rngs.params(), shape, dtype) * std

    def uniform(self, shape, dtype, bound: float):
        if self.abstract:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.random.uniform(self.rngs.params(), shape, dtype, -bound, bound)

    def full(self, shape, dtype, value: float):
        if self.abstract:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jnp.full(shape, value, dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies [h/2], with llama3 scaling when configured."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_llama3 is None:
        return inv
    factor, lo, hi, orig = cfg.rope_llama3
    lo_wavelen, hi_wavelen = orig / lo, orig / hi
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_btnh, positions_bt, inv_freq):
    """Rotate-half RoPE (the HF layout: the two halves of the head dim are the pairs)."""
    ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rot * sin).astype(x_btnh.dtype)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: ModelConfig, init: ParamInit):
        self.scale = nnx.Param(init.full((dim,), _dt(cfg.param_dtype), 1.0))
        self.eps = eps
        self.dtype = _dt(cfg.dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Linear(nnx.Module):
    """y = x W^T (+ b) (+ scale * B A x when LoRA is on).

    Weights keep the HF / PEFT layouts so checkpoints load without transposes:
    ``weight [out, in]``, ``lora_a [r, in]``, ``lora_b [out, r]``.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool, cfg: ModelConfig, name: str, init: ParamInit):
        pdt = _dt(cfg.param_dtype)
        self.weight = nnx.Param(init.normal((d_out, d_in), pdt, 1.0 / math.sqrt(d_in)))
        self.bias = nnx.Param(init.full((d_out,), pdt, 0.0)) if bias else None
        self.dtype = _dt(cfg.dtype)
        lora = cfg.lora
        if lora is not None and name in lora.targets:
            # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the adapter starts as a no-op.
            self.lora_a = nnx.LoRAParam(init.uniform((lora.rank, d_in), jnp.float32, 1.0 / math.sqrt(d_in)))
            self.lora_b = nnx.LoRAParam(init.full((d_out, lora.rank), jnp.float32, 0.0))
            self.lora_scale = lora.scale
            self.lora_dropout = nnx.Dropout(lora.dropout, rngs=init.rngs) if lora.dropout > 0 else None
        else:
            self.lora_a = None
            self.lora_b = None
            self.lora_scale = 0.0
            self.lora_dropout = None

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,oi->...o", x, self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            xd = self.lora_dropout(x) if self.lora_dropout is not None else x
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            y = y + _lora_delta(xd, a, b) * jnp.asarray(self.lora_scale, self.dtype)
        return y


@jax.custom_vjp
def _lora_delta(x, a, b):
    """LoRA's low-rank term ``(x A^T) B^T`` for ``x [..., in]``, ``A [r, in]``, ``B [out, r]``.

    The gradient is written by hand only to pick the product order of ``dB``: as ``(xa^T dy)^T`` it
    transposes the rank-``r`` operand and result, where autodiff's ``dy^T xa`` made XLA:CPU copy every
    layer's output cotangent ``[tokens, out]`` into ``[out, tokens]`` (fused with the elementwise backward
    around it, a slow strided loop: the step on SmolLM2-135M was 10-22% slower). Same values either way;
    forward-mode differentiation (``jax.jvp``) of the term is not defined, and nothing here uses it."""
    return _lora_delta_fwd(x, a, b)[0]


def _lora_delta_fwd(x, a, b):
    xa = jnp.einsum("...i,ri->...r", x, a)
    return jnp.einsum("...r,or->...o", xa, b), (x, a, b, xa)


def _lora_delta_bwd(res, dy):
    x, a, b, xa = res
    dxa = jnp.einsum("...o,or->...r", dy, b)
    db = jnp.einsum("...r,...o->ro", xa, dy).T
    da = jnp.einsum("...r,...i->ri", dxa, x)
    dx = jnp.einsum("...r,ri->...i", dxa, a)
    return dx, da, db


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


@dataclasses.dataclass
class LayerCache:
    """One layer's view of the cache: ``k``/``v`` are ``[b, s, k, h]``, or, when ``index`` is set, the
    stacked ``[layers, b, s, k, h]`` buffers of :class:`KVCache` and the layer is ``index`` (the layer
    writes its new keys in place into its slice of the stacked buffer)."""

    k: jnp.ndarray
    v: jnp.ndarray
    index: Any = None


jax.tree_util.register_dataclass(LayerCache, data_fields=["k", "v", "index"], meta_fields=[])


@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache for all layers, stacked: ``k``/``v`` are ``[layers, b, s, k, h]``.

    ``mask [b, s]`` marks valid slots (False for left padding and unwritten slots);
    ``end`` (int32 scalar) is the next slot to write; an int32 ``[b]`` vector gives every row its
    own next slot (continuous batching: rows joined the batch at different times).
    """

    k: jnp.ndarray
    v: jnp.ndarray
    mask: jnp.ndarray
    end: jnp.ndarray

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = _dt(cfg.dtype) if dtype is None else dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))

    def replace(self, **kw) -> "KVCache":
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "mask", "end"], meta_fields=[])


@dataclasses.dataclass
class StackedState:
    """A model's state for the cached (sampling) path: ``layers`` is the state of one decoder layer
    with every leaf stacked over the layers (``[layers, ...]``), ``rest`` everything else (embedding,
    final norm, LM head). Built once per set of weights (:func:`stack_state`), so the cached forward
    scans over the layers without copying weights at every call."""

    rest: Any
    layers: Any


jax.tree_util.register_dataclass(StackedState, data_fields=["rest", "layers"], meta_fields=[])


def stack_state(state) -> StackedState:
    """:class:`StackedState` of a full model state (``nnx.split(model)[1]``); runs eagerly or under jit."""
    layers = state["layers"]
    per_layer = [layers[i] for i in sorted(layers.keys())]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
    rest = nnx.State({k: v for k, v in state.items() if k != "layers"})
    return StackedState(rest, stacked)


def merge_stacked(graphdef, st: StackedState):
    """The model of a :class:`StackedState` (call under jit). Its per-layer parameters are slices of
    the stack that the cached forward does not use (pass ``layer_stack=st.layers``), so XLA drops them."""
    num = jax.tree_util.tree_leaves(st.layers)[0].shape[0]
    layers = nnx.State({i: jax.tree_util.tree_map(lambda a: a[i], st.layers) for i in range(num)})
    return nnx.merge(graphdef, nnx.State({**dict(st.rest.items()), "layers": layers}))


def attend(q_btnh, k_bskh, v_bskh, mask_bts, impl: str = "xla", block: int = 512):
    """Grouped-query attention; softmax in float32.

    ``mask_bts`` is a boolean ``[b, t, s]`` mask or a :class:`~iopo_jax.models.attention.SegmentMask`
    (segment / prefix ids, no cache); ``impl`` is resolved per platform by
    :func:`~iopo_jax.models.attention.resolve_impl` (``auto``: splash on TPU, cuDNN on GPU, xla (dense) elsewhere).
    """
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    impl = attn_lib.resolve_impl(impl, mask_bts, t)
    if isinstance(mask_bts, attn_lib.SegmentMask):
        if impl == "splash":
            return attn_lib.splash_attention(q_btnh, k_bskh, v_bskh, mask_bts.segment_ids)
        if impl == "cudnn":
            return attn_lib.segment_cudnn_attention(
                q_btnh, k_bskh, v_bskh, mask_bts, lambda m: attend(q_btnh, k_bskh, v_bskh, m, "cudnn"))
        mask_bts = mask_bts.dense()
    if impl in ("cudnn", "cudnn_dense"):
        return jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None], implementation="cudnn").reshape(b, t, n * h)
    if impl == "chunked" and t > block:
        return _attend_chunked(q_btnh, k_bskh, v_bskh, mask_bts, block)
    q = q_btnh.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(h)
    scores = jnp.where(mask_bts[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n * h)


def _attend_chunked(q_btnh, k_bskh, v_bskh, mask_bts, block: int):
    """Query blocks one at a time (``lax.map`` + remat): scores memory is [b, n, block, s]."""
    b, t, n, h = q_btnh.shape
    pad = -t % block
    q = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    m = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0)))
    nb = (t + pad) // block
    q = q.reshape(b, nb, block, n, h).swapaxes(0, 1)
    m = m.reshape(b, nb, block, -1).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        qb, mb = args
        return attend(qb, k_bskh, v_bskh, mb, "xla")

    out = jax.lax.map(one, (q, m))  # [nb, b, block, n*h]
    return out.swapaxes(0, 1).reshape(b, nb * block, n * h)[:, :t]


def _write_rows(buf_bs, x_bt, end_b):
    """``buf[r, end[r]:end[r] + t] = x[r]`` for every row r (per-row cache slots)."""
    def one(buf, x, e):
        return jax.lax.dynamic_update_slice(buf, x, (e,) + (0,) * (buf.ndim - 1))

    return jax.vmap(one)(buf_bs, x_bt, end_b)


def _write_layer(buf_lbskh, x_btkh, index, end):
    """``buf[index, :, end:end + t] = x`` in a stacked ``[layers, b, s, k, h]`` buffer (``end`` scalar or ``[b]``)."""
    if jnp.ndim(end) == 0:
        return jax.lax.dynamic_update_slice(buf_lbskh, x_btkh[None], (index, 0, end, 0, 0))

    # One scatter into the stacked buffer (a vmap over the row axis would change the buffer's layout
    # and copy it whole). Starts are clamped like dynamic_update_slice's.
    b, t = x_btkh.shape[:2]
    start = jnp.clip(end, 0, buf_lbskh.shape[2] - t)
    cols = start[:, None] + jnp.arange(t)[None, :]
    return buf_lbskh.at[index, jnp.arange(b)[:, None], cols].set(x_btkh, mode="promise_in_bounds")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, init: ParamInit):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, n * h, bias=cfg.attention_bias, cfg=cfg, name="q_proj", init=init)
        self.k_proj = Linear(d, k * h, bias=cfg.attention_bias, cfg=cfg, name="k_proj", init=init)
        self.v_proj = Linear(d, k * h, bias=cfg.attention_bias, cfg=cfg, name="v_proj", init=init)
        self.o_proj = Linear(n * h, d, bias=False, cfg=cfg, name="o_proj", init=init)
        self.n, self.k, self.h = n, k, h
        self.impl = cfg.attention_impl
        self.block = cfg.attention_block

    def __call__(self, x_btd, positions_bt, inv_freq, mask_bts, cache: LayerCache | None, end):
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.n, self.h)
        k = self.k_proj(x_btd).reshape(b, t, self.k, self.h)
        v = self.v_proj(x_btd).reshape(b, t, self.k, self.h)
        q = constrain(apply_rope(q, positions_bt, inv_freq), (BATCH_AXES, None, "tensor", None))
        k = apply_rope(k, positions_bt, inv_freq)
        if cache is not None and cache.index is not None:  # stacked cache: write/read this layer's slice
            k_all = _write_layer(cache.k, k.astype(cache.k.dtype), cache.index, end)
            v_all = _write_layer(cache.v, v.astype(cache.v.dtype), cache.index, end)
            cache = LayerCache(k_all, v_all, cache.index)
            k_stack, v_stack, index = k_all, v_all, cache.index
        elif cache is not None:
            if jnp.ndim(end) == 0:
                k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, end, 0, 0))
                v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, end, 0, 0))
            else:  # per-row write slots (continuous batching)
                k_all = _write_rows(cache.k, k.astype(cache.k.dtype), end)
                v_all = _write_rows(cache.v, v.astype(cache.v.dtype), end)
            cache = LayerCache(k_all, v_all)
            k_stack, v_stack, index = k_all[None], v_all[None], 0
        if cache is not None:
            if self.impl == "auto" and cpu_attention.applies(q, k_stack):  # reads the layer's slice in place
                return self.o_proj(cpu_attention.decode_attention(q, k_stack, v_stack, index, mask_bts)), cache
            k = jax.lax.dynamic_index_in_dim(k_stack, index, 0, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(v_stack, index, 0, keepdims=False).astype(q.dtype)
        out = attend(q, k, v, mask_bts, self.impl, self.block)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, init: ParamInit):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=False, cfg=cfg, name="gate_proj", init=init)
        self.up_proj = Linear(d, f, bias=False, cfg=cfg, name="up_proj", init=init)
        self.down_proj = Linear(f, d, bias=False, cfg=cfg, name="down_proj", init=init)

    def __call__(self, x_btd):
        hid = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        hid = constrain(hid, (BATCH_AXES, None, "tensor"))
        return self.down_proj(hid)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, init: ParamInit):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, init)
        self.self_attn = Attention(cfg, init)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, init)
        self.mlp = MLP(cfg, init)

    def __call__(self, x_btd, positions_bt, inv_freq, mask_bts, cache, end):
        attn, cache = self.self_attn(self.input_layernorm(x_btd), positions_bt, inv_freq, mask_bts, cache, end)
        x_btd = x_btd + attn
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, (BATCH_AXES, None, None)), cache


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, init: ParamInit):
        self.embedding = nnx.Param(init.normal((cfg.vocab_size, cfg.hidden_size), _dt(cfg.param_dtype), 0.02))
        self.dtype = _dt(cfg.dtype)

    def __call__(self, ids_bt):
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(self.dtype)


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _run_layer(layer, x, positions, inv_freq, mask, cache, end):
    return layer(x, positions, inv_freq, mask, cache, end)


def _run_layer_remat(layer, x, positions, inv_freq, mask, policy):
    """One layer under ``jax.checkpoint`` (training path, no cache).

    ``nnx.remat`` cannot be used here: inside the jitted steps the model is rebuilt from state in
    the outer trace, and lifting the module into the checkpoint trace then fails ("Cannot mutate
    Param from a different trace level"). Instead the layer is split and a pure function of its
    state is checkpointed; the non-parameter state it changes (dropout RNG counters) is returned
    and written back when dropout is active, so dropout draws the same masks as without remat.
    """
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def pure(params, rest, x, positions, inv_freq, mask):
        module = nnx.merge(graphdef, params, rest)
        y, _ = module(x, positions, inv_freq, mask, None, None)
        _, _, new_rest = nnx.split(module, nnx.Param, ...)
        return y, new_rest

    y, new_rest = jax.checkpoint(pure, policy=policy)(params, rest, x, positions, inv_freq, mask)
    # Only active dropout changes state; in eval mode nothing is written back (the frozen variables
    # of a model rebuilt inside jit may belong to the outer trace and must not be mutated).
    if any(isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0 for _, m in layer.iter_modules()):
        nnx.update(layer, new_rest)
    return y, None


def _run_layers_scanned(layers, x, positions, inv_freq, mask, policy):
    """All layers as one ``lax.scan`` over their stacked states (training path, no cache).

    Parameters stay stored per layer (checkpoints and the HF weight map are unchanged); they are stacked
    along a new leading axis for the scan, so the layer body is traced and compiled once instead of once per
    layer. ``policy`` (not None when ``remat`` is on, ``"full"`` = save nothing) checkpoints the body, as
    :func:`_run_layer_remat` does per layer. The stacked copy of the weights costs their size in memory.
    """
    splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]
    graphdef = splits[0][0]
    stack = lambda *xs: jnp.stack(xs)
    params = jax.tree_util.tree_map(stack, *[p for _, p, _ in splits])
    rest = jax.tree_util.tree_map(stack, *[r for _, _, r in splits])

    def pure(params, rest, x):
        module = nnx.merge(graphdef, params, rest)
        y, _ = module(x, positions, inv_freq, mask, None, None)
        _, _, new_rest = nnx.split(module, nnx.Param, ...)
        return y, new_rest

    if policy is not None:
        pure = jax.checkpoint(pure, policy=None if policy == "full" else policy)

    def body(x, state):
        y, new_rest = pure(state[0], state[1], x)
        return y, new_rest

    x, new_rest = jax.lax.scan(body, x, (params, rest))
    if any(isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0 for _, m in layers[0].iter_modules()):
        for i, layer in enumerate(layers):
            nnx.update(layer, jax.tree_util.tree_map(lambda a: a[i], new_rest))
    return x


def _run_layers_cached(layers, stack, x, positions, inv_freq, mask, cache: KVCache, end):
    """The layers over the stacked KV cache (each layer writes its new keys in place into its slice).

    With ``stack`` (the stacked layer state, :class:`StackedState` ``.layers``) the layers run as one
    ``lax.scan``: the layer body is traced and compiled once, whatever the number of layers. Without it
    they are unrolled over the modules' own weights (one compiled copy per layer; on XLA:CPU a loop
    materialises each layer's weight slice every step, so unrolled decode steps are faster there)."""
    if stack is None:
        k_all, v_all = cache.k, cache.v
        for i, layer in enumerate(layers):
            x, lc = layer(x, positions, inv_freq, mask, LayerCache(k_all, v_all, i), end)
            k_all, v_all = lc.k, lc.v
        return x, k_all, v_all
    graphdef = nnx.split(layers[0])[0]

    def body(carry, xs):
        x, k_all, v_all = carry
        st, i = xs
        layer = nnx.merge(graphdef, st)
        x, lc = layer(x, positions, inv_freq, mask, LayerCache(k_all, v_all, i), end)
        return (x, lc.k, lc.v), None

    (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (stack, jnp.arange(len(layers), dtype=jnp.int32)))
    return x, k, v


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__`` returns final-norm hidden states; :meth:`logits` projects.

    ``abstract=True`` builds the module tree with ``jax.ShapeDtypeStruct`` parameters (see
    :class:`ParamInit`): instant and allocation-free, for loading and shape inspection.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, abstract: bool = False):
        init = ParamInit(rngs, abstract)
        self.config = cfg
        self.embed = Embed(cfg, init)
        self.layers = nnx.List([DecoderLayer(cfg, init) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, init)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, cfg=cfg.replace(lora=None), name="lm_head", init=init)

    def __call__(self, input_ids_bt, positions_bt=None, segment_ids_bt=None, cache: KVCache | None = None,
                 prefix_ids_bt=None, layer_stack=None):
        """``prefix_ids_bt`` (no cache only): shared-prompt packing, see :mod:`iopo_jax.models.attention`.

        With a ``cache`` and ``layer_stack`` (``StackedState.layers``, see :func:`stack_state`: the layer
        weights stacked once) the layers run as one ``lax.scan``; without ``layer_stack`` they are unrolled."""
        cfg = self.config
        b, t = input_ids_bt.shape
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inv_freq(cfg)
        end = None
        if cache is None:
            mask = attn_lib.SegmentMask(segment_ids_bt, prefix_ids_bt)
        else:
            end = cache.end
            slots = jnp.arange(cache.mask.shape[1])
            if jnp.ndim(end) == 0:
                kv_mask = jax.lax.dynamic_update_slice(cache.mask, segment_ids_bt != 0, (0, end))
                causal = slots[None, None, :] <= (end + jnp.arange(t))[None, :, None]
            else:  # per-row ``end [b]``: row r writes slots [end[r], end[r] + t)
                kv_mask = _write_rows(cache.mask, segment_ids_bt != 0, end)
                causal = slots[None, None, :] <= (end[:, None] + jnp.arange(t)[None, :])[:, :, None]
            mask = causal & kv_mask[:, None, :]
        x = constrain(self.embed(input_ids_bt), (BATCH_AXES, None, None))
        remat = cfg.remat != "none" and cache is None
        new_cache = None
        if cache is not None:
            x, k_all, v_all = _run_layers_cached(list(self.layers), layer_stack, x, positions_bt, inv_freq, mask,
                                                 cache, end)
            new_cache = KVCache(k_all, v_all, kv_mask, end + t)
        elif cfg.scan_layers:
            x = _run_layers_scanned(list(self.layers), x, positions_bt, inv_freq, mask,
                                    ("full" if cfg.remat == "full" else _REMAT[cfg.remat]) if remat else None)
        else:
            for layer in self.layers:
                if remat:
                    x, _ = _run_layer_remat(layer, x, positions_bt, inv_freq, mask, _REMAT[cfg.remat])
                else:
                    x, _ = _run_layer(layer, x, positions_bt, inv_freq, mask, None, None)
        x = self.norm(x)
        return x, new_cache

    def lm_head_weight(self) -> jnp.ndarray:
        """The [v, d] output projection (the embedding itself when tied)."""
        if self.lm_head is None:
            return self.embed.embedding[...]
        return self.lm_head.weight[...]

    def logits(self, hidden_btd) -> jnp.ndarray:
        """Float32 logits [.., v]. Materialises the vocabulary axis: use iopo_jax.logprobs for training."""
        return lm_head_logits(hidden_btd, self.lm_head_weight(), _dt(self.config.dtype))


def lm_head_logits(hidden, weight_vd, dtype) -> jnp.ndarray:
    """Float32 logits ``[..., v]`` of hidden states ``[..., d]`` under the ``[v, d]`` output projection, both
    cast to the compute ``dtype`` (the one LM-head product of the model, the trainer and the RL learner)."""
    return jnp.einsum("...d,vd->...v", hidden.astype(dtype), weight_vd.astype(dtype),
                      preferred_element_type=jnp.float32)


def padding_inputs(attention_mask_bt):
    """positions and segment ids for a (left- or right-) padded batch from its 0/1 attention mask."""
    am = attention_mask_bt.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)
    return positions, am


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
