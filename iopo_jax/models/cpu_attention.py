"""Decode attention for XLA:CPU: a small C++ kernel called through the XLA FFI.

On XLA:CPU the cached (decode) attention, written as einsums, becomes a batched ``dot`` with one tiny
``[g, h] x [h, s]`` product per (row, kv head); XLA runs it at a few GFLOP/s, and at batch 32 it takes more
of a decode step than the model's weights (bench/decode_attention.py). ``cpu_attention.cc`` computes the
same attention (softmax in float32) reading each cached key and value once per (row, kv head) for all its
query heads, skipping masked-out slots, over XLA's intra-op thread pool.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``g++`` / ``c++``) against
the FFI headers that ship with jaxlib, into ``~/.cache/iopo_jax/kernels`` (:func:`iopo_jax.paths.cache_root`), keyed by
the source, jaxlib's version and the CPU. Without a compiler, or with ``IOPO_JAX_CPU_KERNELS=0``, the einsum
path runs instead (same results up to float rounding); :func:`status` says which and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform as _platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from iopo_jax.models.attention import platform
from iopo_jax.paths import cache_root
from iopo_jax.sharding import current_mesh

log = logging.getLogger("iopo_jax.cpu_attention")

_TARGET = "iopo_cpu_decode_attention"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
_LOCK = threading.Lock()
_STATE: dict = {}  # "ok": bool, "reason": str, "library": path
MAX_NEW_TOKENS = 16  # longer query blocks (prefill chunks) are matrix products XLA runs well


def _cache_dir() -> str:
    return os.path.join(cache_root(), "kernels")


def _cpu_key() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{_platform.machine()}|{flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> str:
    """Compile the kernel (once per source / jaxlib / CPU) and return the shared library's path."""
    with open(_SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(src + jaxlib.__version__.encode() + _cpu_key().encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"cpu_attention_{key}.so")
    if os.path.exists(out):
        return out
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-std=c++17", "-shared",
           "-fPIC", "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent processes each build, one file wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("compiled the CPU decode-attention kernel: %s", out)
    return out


def status() -> tuple[bool, str]:
    """``(usable, reason)``: whether the kernel is built and registered (building it on first call)."""
    with _LOCK:
        if not _STATE:
            if os.environ.get("IOPO_JAX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
                _STATE.update(ok=False, reason="disabled by IOPO_JAX_CPU_KERNELS")
            else:
                try:
                    path = _build()
                    lib = ctypes.cdll.LoadLibrary(path)
                    for dtype, sym in (("f32", lib.IopoDecodeAttentionF32), ("bf16", lib.IopoDecodeAttentionBF16)):
                        jax.ffi.register_ffi_target(f"{_TARGET}_{dtype}", jax.ffi.pycapsule(sym), platform="cpu")
                    _STATE.update(ok=True, reason=f"compiled kernel {path}", library=path)
                except Exception as e:  # noqa: BLE001 - any failure means: use the einsum path, and say why
                    _STATE.update(ok=False, reason=f"CPU decode-attention kernel unavailable: {e}")
                    log.warning("%s; using the einsum attention", _STATE["reason"])
        return _STATE["ok"], _STATE["reason"]


def applies(q_btnh, k_cache) -> bool:
    """Whether a cached attention call with these operands runs the kernel: CPU, no multi-device mesh,
    float32 or bfloat16 with one dtype, at most :data:`MAX_NEW_TOKENS` new tokens, and the kernel usable."""
    if platform() != "cpu" or q_btnh.shape[1] > MAX_NEW_TOKENS:
        return False
    if q_btnh.dtype != k_cache.dtype or q_btnh.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    mesh = current_mesh()
    if mesh is not None and mesh.size > 1:
        return False
    return status()[0]


def decode_attention(q_btnh, k_lbskh, v_lbskh, layer, mask_bts):
    """Attention of ``q [b, t, n, h]`` over layer ``layer`` of the stacked cache ``k/v [L, b, s, kh, h]``
    with the boolean ``mask [b, t, s]`` -> ``[b, t, n * h]`` (rows that see no slot give zeros)."""
    b, t, n, h = q_btnh.shape
    name = f"{_TARGET}_{'bf16' if q_btnh.dtype == jnp.bfloat16 else 'f32'}"
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(q_btnh.shape, q_btnh.dtype), vmap_method="sequential")
    out = call(q_btnh, k_lbskh, v_lbskh, jnp.asarray(layer, jnp.int32), mask_bts.astype(jnp.bool_),
               scale=np.float32(1.0 / math.sqrt(h)))
    return out.reshape(b, t, n * h)
