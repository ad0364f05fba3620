"""Device meshes and partition rules over the named axes ``data``, ``fsdp`` and ``tensor``.

- ``data``: pure data parallelism (parameters replicated along it).
- ``fsdp``: data parallelism with parameters (and optimizer state) sharded along it.
- ``tensor``: tensor (model) parallelism: attention heads, MLP hidden units and vocabulary split.

The batch is sharded over ``("data", "fsdp")``. Parameters follow :data:`PARAM_RULES`, one regex
per parameter path. A mesh axis that does not divide a dimension is dropped for that dimension
(the dimension is replicated instead, with a warning naming the parameter and the axis), so every
rule works for every model size.

Example::

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 2})   # -1: "the rest of the devices"
    with use_mesh(mesh):
        ...
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


class MeshError(ValueError):
    """The requested mesh does not fit the available devices."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill in one ``-1`` axis and check that the product equals ``num_devices``."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {sizes} does not divide the {num_devices} available devices "
                f"({num_devices} is not a multiple of {fixed})")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {sizes} needs {fixed} devices but {num_devices} are available; "
            "make the product of the axis sizes equal the device count or set one axis to -1")
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor). Default: everything on ``fsdp``."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape or {"fsdp": -1}, len(devices))
    dims = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # CPU devices or unusual topologies: plain reshape is fine there
        arr = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(arr, AXES)


# Parameter partition rules: (regex on the '.'-joined parameter path, spec per dimension).
# Weights keep the HF layout: linear weights [out, in], LoRA A [r, in], LoRA B [out, r].
PARAM_RULES: list[tuple[str, tuple]] = [
    (r"embed\.embedding$", ("tensor", "fsdp")),  # [vocab, d]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),  # [out, d]
    (r"(q_proj|k_proj|v_proj)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),  # [d, in]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_a$", (None, "fsdp")),  # [r, d]
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_b$", ("tensor", None)),  # [out, r]
    (r"(o_proj|down_proj)\.lora_a$", (None, "tensor")),  # [r, in]
    (r"(o_proj|down_proj)\.lora_b$", ("fsdp", None)),  # [d, r]
    (r"lm_head\.weight$", ("tensor", "fsdp")),  # [vocab, d]
    (r"(norm|layernorm)\.scale$", (None,)),
]


class ShardingError(ValueError):
    """A mesh axis does not divide the parameter dimension it is meant to shard (strict mode)."""


_REPLICATED_WARNED: set = set()  # (parameter path, axis) already logged


def fit_spec(spec: Sequence, shape: Sequence[int], mesh: Mesh | None, *, param: str | None = None,
             strict: bool = False) -> P:
    """``spec`` for an array of ``shape`` on ``mesh``: a mesh axis that does not divide its dimension is
    dropped and that dimension is replicated instead (so every rule works for every model size).

    For a parameter (``param``: its path) such a drop is logged once per (path, axis), naming both, or
    raises :class:`ShardingError` when ``strict``. Batch and activation specs (no ``param``) drop silently:
    an uneven last batch is normal."""
    out = []
    for d, (dim, axis) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axis is None or mesh is None:
            out.append(axis if mesh is None else None)
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        names = tuple(n for n in names if n in mesh.shape)
        size = math.prod(mesh.shape[n] for n in names)
        if names and dim % size == 0:
            out.append(names if len(names) > 1 else names[0])
            continue
        out.append(None)
        if names and param is not None:
            msg = (f"parameter '{param}' {tuple(shape)}: mesh axis {axis!r} (size {size}) does not divide "
                   f"dimension {d} ({dim}); that dimension is replicated on every device of the axis")
            if strict:
                raise ShardingError(msg + " (strict sharding: choose a mesh whose axis sizes divide it)")
            if (param, axis) not in _REPLICATED_WARNED:
                _REPLICATED_WARNED.add((param, axis))
                log.warning("%s", msg)
    return P(*out)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh | None = None, *, strict: bool = False) -> P:
    """PartitionSpec of one parameter, from :data:`PARAM_RULES` (see :func:`fit_spec` for the axes that do
    not divide a dimension; ``strict`` makes them an error). Unknown paths raise."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh, param=path, strict=strict)
    raise KeyError(f"no partition rule matches parameter '{path}'; add one to iopo_jax.sharding.PARAM_RULES")


def path_str(path: Sequence) -> str:
    """'layers.0.self_attn.q_proj.weight' from a pytree key path (nnx '.value' attributes dropped)."""
    parts = []
    for p in path:
        if hasattr(p, "key"):
            parts.append(str(p.key))
        elif hasattr(p, "idx"):
            parts.append(str(p.idx))
        elif hasattr(p, "name"):
            if p.name != "value":
                parts.append(str(p.name))
        else:
            parts.append(str(p))
    return ".".join(parts)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every leaf of an nnx State / pytree of arrays keyed by parameter path."""

    def one(path, leaf):
        return NamedSharding(mesh, param_spec(path_str(path), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a batch array: leading dim over (data, fsdp), the rest replicated."""
    spec = (BATCH_AXES,) + (None,) * (ndim - 1)
    if shape is not None:
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))
    return NamedSharding(mesh, P(*spec))


# ----------------------------------------------------------------------------- host <-> device
# Two ways in, because two kinds of host data exist in a multi-process run:
# * put_local_rows: each process holds only ITS rows of a batch (the data pipeline shards the records over
#   the processes); the global array is their concatenation in process order.
# * put_global: every process holds the WHOLE value (rollouts, sampler inputs built from the same prompts);
#   each device takes its slice of it.
# Two ways out, their inverses: host_local_rows (this process's rows again) and host_value (the whole value).
def put_local_rows(x, mesh: Mesh | None) -> jax.Array:
    """This process's rows of a batch -> the global array sharded over (data, fsdp) along dim 0, whose rows
    are those of every process in process order (``x.shape[0] * process_count`` rows). Every process must
    call it with the same local shape. ``mesh=None``: a plain single-device array."""
    x = np.asarray(x)
    if mesh is None:
        return jnp.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, global_shape), x, global_shape)


def put_global(x, mesh: Mesh | None) -> jax.Array:
    """A value that every process holds whole (the same on each) -> an array sharded over (data, fsdp)
    along dim 0 (replicated where the axes do not divide it). Within one process this is ``device_put``;
    across processes each device is filled from its slice of ``x`` (nothing is exchanged).
    ``mesh=None``: a plain single-device array."""
    x = np.asarray(x)
    if mesh is None:
        return jnp.asarray(x)
    sharding = batch_sharding(mesh, x.ndim, x.shape)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_local_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array: the inverse of :func:`put_local_rows` (no
    exchange between processes; a fully addressable array comes back whole)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0 if sh.index else 0
        shards.setdefault(start, sh.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def host_value(x) -> np.ndarray:
    """The whole value of an array on this host: ``np.asarray`` when this process holds all of it (or a full
    replica), an all-gather over the processes when it is sharded across hosts (every process must then
    make the same call, in the same order, as with any collective)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def current_mesh():
    """The mesh set by :func:`use_mesh` (an AbstractMesh), or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if (m is None or m.empty) else m


def constrain(x, spec: Sequence):
    """``with_sharding_constraint`` under the current mesh; a no-op without one.

    Axes that do not divide a dimension are dropped for it.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Make ``mesh`` the current mesh (activation constraints use it). ``None``: no mesh."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield
