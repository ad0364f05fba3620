"""Attention kernels by platform, and the masks the model hands them.

The training / scoring forward (no KV cache) describes who sees whom with per-token ids instead of a
dense ``[b, t, s]`` mask, so fused kernels can use them directly:

- ``segment_ids [b, t]``: token i attends to token j <= i of the same non-zero segment (0 = padding);
- ``prefix_ids [b, t]`` (optional, shared-prompt packing): token i also attends to every token j <= i whose
  segment id equals ``prefix_ids[i]`` (0 = no prefix). A row ``[x | y1 | y2]`` with segments 1, 2, 3 and
  prefix 1 on y1 and y2 lets both answers see the prompt, and y2 not see y1.

Implementations (``ModelConfig.attention_impl``):

- ``xla``: einsum attention with the dense mask (any device);
- ``chunked``: the same, one block of queries at a time under remat (any device, long sequences);
- ``splash``: the Pallas TPU splash-attention kernel (causal + segment ids; blocks of 128-512 tokens).
  On other platforms it runs in Pallas interpret mode (slow; for tests);
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, causal, with per-row sequence
  lengths when every row is one right-padded sequence (checked at run time; packed rows use the dense mask);
- ``auto``: splash on TPU, cudnn on GPU, xla (dense) elsewhere. The platform is the one of the current mesh's
  devices (so compiling ahead of time for a TPU topology picks splash on a CPU host), else the default backend.

Layouts splash cannot express (prefix ids, a length that is not a multiple of 128) fall back to ``chunked``.
The KV-cache (decode) path uses the dense mask; on CPU with ``auto``, calls with at most 16 new tokens run
the C++ decode-attention kernel of :mod:`iopo_jax.models.cpu_attention` instead (``xla`` keeps the einsums).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from iopo_jax.sharding import BATCH_AXES, current_mesh, fit_spec


@dataclasses.dataclass
class SegmentMask:
    """Who sees whom without a cache (see the module docstring)."""

    segment_ids: jnp.ndarray  # [b, t] int32
    prefix_ids: jnp.ndarray | None = None  # [b, t] int32 or None

    def dense(self) -> jnp.ndarray:
        """The boolean ``[b, t, t]`` mask."""
        seg = self.segment_ids
        t = seg.shape[1]
        idx = jnp.arange(t)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = seg[:, :, None] == seg[:, None, :]
        if self.prefix_ids is not None:
            same = same | (self.prefix_ids[:, :, None] == seg[:, None, :])
        return same & (seg[:, None, :] != 0) & causal


jax.tree_util.register_dataclass(SegmentMask, data_fields=["segment_ids", "prefix_ids"], meta_fields=[])


def platform() -> str:
    """'tpu', 'gpu', 'cpu', ...: the current mesh's device platform, else jax's default backend."""
    mesh = current_mesh()
    p = None
    if mesh is not None:
        dev = getattr(mesh, "abstract_device", None)
        p = getattr(dev, "platform", None)
    p = (p or jax.default_backend()).lower()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def resolve_impl(impl: str, mask, t: int) -> str:
    """The implementation that runs for this call (``auto`` resolved, impossible layouts replaced)."""
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(platform(), "xla")
    if not isinstance(mask, SegmentMask):  # KV cache / explicit dense mask
        return "chunked" if impl == "splash" else ("xla" if impl == "cudnn_lengths" else impl)
    if impl == "splash" and (mask.prefix_ids is not None or t % 128):
        return "chunked"
    if impl == "cudnn" and mask.prefix_ids is not None:
        return "cudnn_dense"
    return impl


# ----------------------------------------------------------------------------- splash (TPU)
def _splash_block(t: int) -> int:
    for b in (512, 256, 128):
        if t % b == 0:
            return b
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {t}")


@functools.lru_cache(maxsize=64)
def _splash_kernel(groups: int, t: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blk = _splash_block(t)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(groups)])
    # One kv head and its `groups` query heads per call (MQA kernel), vmapped over batch and kv heads.
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, *, interpret: bool | None = None):
    """Causal grouped-query attention with segment ids through the Pallas splash kernel -> ``[b, t, n*h]``.

    ``interpret`` defaults to True off TPU (Pallas interpret mode: same maths, plain XLA ops). Under a mesh the
    kernel runs per shard (``shard_map`` over the batch axes, kv heads over ``tensor`` when they divide).
    """
    if interpret is None:
        interpret = platform() != "tpu"
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    g = n // kh
    kernel = _splash_kernel(g, t, bool(interpret))

    def local(q, k, v, seg):
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        bl, tl = q.shape[:2]
        kl = k.shape[2]
        qs = (q * (1.0 / math.sqrt(h))).astype(q.dtype).reshape(bl, tl, kl, g, h).transpose(0, 2, 3, 1, 4)
        ks = k.transpose(0, 2, 1, 3)  # [b, k, t, h]
        vs = v.transpose(0, 2, 1, 3)

        def one(qq, kk, vv, ss):  # qq [g, t, h], kk/vv [t, h], ss [t]
            return kernel(qq, kk, vv, segment_ids=sa.SegmentIds(ss, ss))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qs, ks, vs, seg)  # [b, k, g, t, h]
        return out.transpose(0, 3, 1, 2, 4).reshape(bl, tl, kl * g * h)

    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return local(q_btnh, k_btkh, v_btkh, segment_ids_bt)
    from jax.sharding import PartitionSpec as P

    bspec = fit_spec((BATCH_AXES,), (b,), mesh)[0]
    hspec = fit_spec(("tensor",), (kh,), mesh)[0]
    qkv = P(bspec, None, hspec, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(bspec, None)),
                       out_specs=P(bspec, None, hspec), check_vma=False)
    return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)


# ----------------------------------------------------------------------------- cuDNN (GPU)
def right_padded_lengths(segment_ids_bt):
    """``(lengths [b], ok)``: tokens per row, and whether every row is one right-padded sequence (ids 1 then 0)."""
    seg = segment_ids_bt
    lengths = jnp.sum(seg != 0, axis=1, dtype=jnp.int32)
    expect = (jnp.arange(seg.shape[1])[None, :] < lengths[:, None]).astype(seg.dtype)
    return lengths, jnp.all(seg == expect)


def lengths_attention(q_btnh, k_btkh, v_btkh, lengths_b, implementation: str | None = "cudnn"):
    """Causal attention of right-padded rows given their lengths (no dense mask) -> ``[b, t, n*h]``.

    Rows past their length are padding (their outputs are not used downstream)."""
    b, t, n, h = q_btnh.shape
    out = jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, is_causal=True, query_seq_lengths=lengths_b,
                                       key_value_seq_lengths=lengths_b, implementation=implementation)
    valid = jnp.arange(t)[None, :] < lengths_b[:, None]
    return jnp.where(valid[:, :, None], out.reshape(b, t, n * h), 0).astype(out.dtype)


def segment_cudnn_attention(q_btnh, k_btkh, v_btkh, mask: SegmentMask, dense_attend):
    """cuDNN with sequence lengths when every row is one right-padded sequence, else ``dense_attend(mask)``
    (a ``lax.cond`` at run time: packed rows stay correct)."""
    lengths, ok = right_padded_lengths(mask.segment_ids)
    return jax.lax.cond(ok, lambda: lengths_attention(q_btnh, k_btkh, v_btkh, lengths, "cudnn"),
                        lambda: dense_attend(mask.dense()))
