"""LoRA adapters: split/merge, PEFT-format export and import, merged HF export.

Our LoRA parameters keep PEFT's layouts (``lora_a [r, in]``, ``lora_b [out, r]``, scale alpha/r),
so an adapter maps to and from ``adapter_model.safetensors`` key by key.

Example::

    model, cfg = load_model_with_adapter("/ckpt/Qwen2-7B-Instruct", "/runs/iopo/export/adapter")
    export_peft(model, "/tmp/adapter", base_model_name_or_path="Qwen/Qwen2-7B-Instruct")
    export_merged(model, "/tmp/merged")   # plain HF checkpoint, servable by vLLM
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iopo_jax.models.config import LORA_TARGETS_ALL, LoRAConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.models.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from iopo_jax.models.weights import base_params, export_hf, load_model, load_tensor
from iopo_jax.sharding import host_value, param_spec, path_str

PEFT_PREFIX = "base_model.model."


def _flat(state) -> dict[str, jax.Array]:
    out = {}
    jax.tree_util.tree_map_with_path(lambda p, x: out.__setitem__(path_str(p), x), nnx.to_pure_dict(state))
    return out


def lora_params(model: Transformer) -> dict[str, jax.Array]:
    """{our path: array} of the LoRA parameters (``...q_proj.lora_a`` etc.)."""
    _, lora, _ = nnx.split(model, nnx.LoRAParam, ...)
    return _flat(lora)


def _peft_key(our_path: str) -> str:
    """'layers.3.self_attn.q_proj.lora_a' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    mod, which = our_path.rsplit(".", 1)
    return f"{PEFT_PREFIX}model.{mod}.{'lora_A' if which == 'lora_a' else 'lora_B'}.weight"


def merged_params(model: Transformer) -> dict[str, jax.Array]:
    """Base parameters with every adapter folded in: W + (alpha/r) B A (float32 math)."""
    cfg = model.config
    params = dict(base_params(model))
    lora = lora_params(model)
    if not lora:
        return params
    scale = cfg.lora.scale
    merge = jax.jit(lambda w, a, b: (w.astype(jnp.float32) + scale * (b @ a)).astype(w.dtype))
    for path in [p for p in lora if p.endswith("lora_a")]:
        mod = path[: -len(".lora_a")]
        w = params[mod + ".weight"]
        params[mod + ".weight"] = merge(w, lora[path], lora[mod + ".lora_b"])
    return params


def export_merged(model: Transformer, out_dir: str, **kw) -> str:
    """A plain HF checkpoint with LoRA merged in (transformers / vLLM load it)."""
    return export_hf(model, out_dir, params=merged_params(model), **kw)


def export_peft(model: Transformer, out_dir: str, base_model_name_or_path: str = "") -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft`` loads."""
    cfg = model.config
    if cfg.lora is None:
        raise ValueError("export_peft: the model has no LoRA adapter (config.lora is None)")
    lora = lora_params(model)
    items = [(_peft_key(p), tuple(a.shape), np.dtype(np.float32), (lambda a=a: host_value(a))) for p, a in sorted(lora.items())]
    if jax.process_index() != 0:
        for *_, produce in items:
            produce()
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), items)
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": sorted(cfg.lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "revision": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_cfg, f, indent=2)
    return out_dir


def read_adapter_config(adapter_dir: str) -> LoRAConfig:
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"adapter_config.json not found in {adapter_dir}")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type '{c.get('peft_type')}' is not supported (only LORA)")
    for field, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if c.get(field, ok) != ok:
            raise CheckpointError(f"{path}: {field}={c.get(field)} is not supported")
    # Per-module ranks / alphas would need a LoRA config per module: refuse rather than load wrong scales.
    for field in ("alpha_pattern", "rank_pattern"):
        if c.get(field):
            raise CheckpointError(f"{path}: {field}={c[field]!r} is not supported (one r and lora_alpha for every "
                                  "module); merge the adapter into the base weights with PEFT first, or export it "
                                  f"without {field}")
    targets = c.get("target_modules") or list(LORA_TARGETS_ALL)
    if isinstance(targets, str):
        targets = list(LORA_TARGETS_ALL) if targets == "all-linear" else [targets]
    targets = [t.rsplit(".", 1)[-1] for t in targets]
    bad = [t for t in targets if t not in LORA_TARGETS_ALL]
    if bad:
        raise CheckpointError(f"{path}: target_modules {bad} are not supported (only {LORA_TARGETS_ALL})")
    return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=0.0, targets=tuple(targets))


def load_adapter_into(model: Transformer, adapter_dir: str, mesh=None) -> Transformer:
    """Fill the model's LoRA parameters from a PEFT adapter directory (shapes must match)."""
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    st = SafetensorsFile(path)
    try:
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        pure = nnx.to_pure_dict(lora)
        used = set()

        def fill(p, leaf):
            key = _peft_key(path_str(p))
            if key not in st.entries:
                alt = key.replace(".weight", ".default.weight")
                if alt not in st.entries:
                    raise CheckpointError(f"{path}: tensor '{key}' is missing from the adapter")
                key = alt
            used.add(key)
            shape = st.shape(key)
            if shape != tuple(leaf.shape):
                raise CheckpointError(f"{path}: tensor '{key}' has shape {shape}, expected {tuple(leaf.shape)}")
            sharding = None
            if mesh is not None:
                from jax.sharding import NamedSharding

                sharding = NamedSharding(mesh, param_spec(path_str(p), leaf.shape, mesh))
            return load_tensor(st, key, leaf.dtype, sharding)

        pure = jax.tree_util.tree_map_with_path(fill, pure)
        extra = sorted(set(st.entries) - used)
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor '{extra[0]}' (not a LoRA factor of the chosen targets)")
        nnx.replace_by_pure_dict(lora, pure)
        return nnx.merge(graphdef, lora, rest)
    finally:
        st.close()


def load_model_with_adapter(base_dir: str, adapter_dir: str, mesh=None, **overrides):
    """Base checkpoint + PEFT adapter -> (model with LoRA, cfg)."""
    lora_cfg = read_adapter_config(adapter_dir)
    model, cfg = load_model(base_dir, mesh=mesh, lora=lora_cfg, **overrides)
    return load_adapter_into(model, adapter_dir, mesh=mesh), cfg
