"""HF checkpoints <-> iopo-jax parameters: one declarative weight map, sharded loading, HF export.

Loading builds the model abstractly (shapes only), then copies each tensor straight into the
64-byte aligned host buffers of the slices that this host's devices hold under the parameter's
``NamedSharding`` (row slices with positioned reads, ``os.preadv``; column slices and dtype casts
in one pass out of a memory map of the file), and places them with ``jax.make_array_from_callback``. The model is never gathered on one device and never
held twice in host memory; on CPU the devices alias the aligned buffers. Export streams tensor
by tensor into safetensors shards that ``transformers`` loads. The file format itself (reading and
writing safetensors) is :mod:`iopo_jax.models.safetensors_io`.

Example::

    model, cfg = load_model("/ckpt/Qwen2-7B-Instruct", mesh=make_mesh({"fsdp": -1}))
    export_hf(model, "/tmp/exported")          # config.json + model.safetensors(+index)
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from data_pipeline.hashing import sha256_int
from iopo_jax.models.config import ModelConfig
from iopo_jax.models.safetensors_io import (Box, Checkpoint, CheckpointError, SafetensorsFile, aligned_empty,
                                          index_box, write_safetensors)
from iopo_jax.models.transformer import Transformer
from iopo_jax.sharding import host_value, param_spec, path_str

# ----------------------------------------------------------------------------- the map
@dataclasses.dataclass(frozen=True)
class WeightRule:
    """HF key <-> our parameter path; ``{i}`` is the layer index.

    ``to_ours``/``to_hf`` are the array transforms of each direction (None = identity: our weights
    keep the HF layouts); they exist so that a family with another layout only edits this table.
    A tensor with a ``to_ours`` transform is read whole on each host before it is sliced.
    """

    hf: str
    ours: str
    when: Callable[[ModelConfig], bool] = lambda cfg: True
    to_ours: Callable[[np.ndarray], np.ndarray] | None = None
    to_hf: Callable[[np.ndarray], np.ndarray] | None = None


_LINEARS = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]

WEIGHT_MAP: list[WeightRule] = (
    [WeightRule("model.embed_tokens.weight", "embed.embedding"),
     WeightRule("model.norm.weight", "norm.scale"),
     WeightRule("lm_head.weight", "lm_head.weight", when=lambda c: not c.tie_word_embeddings),
     WeightRule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.scale"),
     WeightRule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.scale")]
    + [WeightRule(f"model.layers.{{i}}.{m}.{p}.weight", f"layers.{{i}}.{m}.{p}.weight") for m, p in _LINEARS]
    + [WeightRule(f"model.layers.{{i}}.self_attn.{p}.bias", f"layers.{{i}}.self_attn.{p}.bias",
                  when=lambda c: c.attention_bias) for p in ("q_proj", "k_proj", "v_proj")]
)

# HF keys that may be present and carry nothing we need.
IGNORED_HF_KEYS = [r"rotary_emb\.inv_freq$"]


def expand_map(cfg: ModelConfig) -> dict[str, tuple[str, WeightRule]]:
    """{our parameter path: (hf key, rule)} for every base parameter of this architecture."""
    out = {}
    for rule in WEIGHT_MAP:
        if not rule.when(cfg):
            continue
        layers = range(cfg.num_layers) if "{i}" in rule.hf else [None]
        for i in layers:
            fmt = (lambda s: s.replace("{i}", str(i))) if i is not None else (lambda s: s)
            out[fmt(rule.ours)] = (fmt(rule.hf), rule)
    return out


# ----------------------------------------------------------------------------- load
def abstract_model(cfg: ModelConfig, dropout_seed: int = 1):
    """``(graphdef, params, rest)``: the parameters as ``jax.ShapeDtypeStruct`` leaves, nothing
    allocated or traced (``rest``: the real dropout RNG streams, if any)."""
    dropout = cfg.lora is not None and cfg.lora.dropout > 0
    rngs = nnx.Rngs(dropout=dropout_seed) if dropout else nnx.Rngs()  # no key to make otherwise
    return nnx.split(Transformer(cfg, rngs, abstract=True), nnx.Param, ...)


def _lora_init(path: str, shape, dtype, seed: int):
    """Deterministic LoRA init per parameter path (A uniform like PEFT, B zeros)."""
    if path.endswith("lora_b"):
        return np.zeros(shape, dtype)
    digest = sha256_int(path, 4)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), digest)
    bound = 1.0 / math.sqrt(shape[1])
    return np.asarray(jax.random.uniform(key, shape, jnp.float32, -bound, bound), dtype)


def _aligned_copy(src: np.ndarray, dtype) -> np.ndarray:
    """Copy into a fresh 64-byte aligned buffer (see :func:`aligned_empty`)."""
    out = aligned_empty(src.shape, dtype)
    np.copyto(out, src, casting="unsafe")
    return out


def _boxes(sharding, shape) -> list[Box]:
    """The distinct slices of a ``shape`` tensor that this host's devices hold (whole without a sharding)."""
    if sharding is None:
        return [tuple((0, n) for n in shape)]
    return list(dict.fromkeys(index_box(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()))


def _split_host(host: np.ndarray, dtype, sharding) -> tuple[tuple, dict]:
    """(shape, {box: aligned copy}) of an array already in host memory."""
    return host.shape, {b: _aligned_copy(host[tuple(slice(*x) for x in b)], dtype) for b in _boxes(sharding, host.shape)}


def read_shards(st: SafetensorsFile, name: str, dtype, sharding=None, to_ours=None) -> tuple[tuple, dict]:
    """Host half of loading one tensor: ``(shape, {box: buffer})`` for the slices this host's
    devices hold, each read once (devices holding the same slice share it). Thread-safe."""
    dt, shape, _ = st.entries[name]
    if to_ours is not None:  # a layout transform needs the whole tensor
        return _split_host(to_ours(st.read(name, [tuple((0, n) for n in shape)], dt)[0]), dtype, sharding)
    boxes = _boxes(sharding, shape)
    return tuple(shape), dict(zip(boxes, st.read(name, boxes, dtype)))


def place_shards(shape, shards: dict, sharding=None):
    """Device half: a ``jax.Array`` from :func:`read_shards`' buffers (aliased, not copied, on CPU)."""
    if sharding is None:
        (buf,) = shards.values()
        return jax.device_put(buf)
    return jax.make_array_from_callback(shape, sharding, lambda index: shards[index_box(index, shape)])


def load_tensor(st: SafetensorsFile, name: str, dtype, sharding=None, to_ours=None):
    """One checkpoint tensor as a ``jax.Array`` with ``sharding`` (None: the default device)."""
    return place_shards(*read_shards(st, name, dtype, sharding, to_ours), sharding)


def _ordered(tasks: list[Callable], threads: int):
    """Results of ``tasks`` in order, computed by ``threads`` threads at most ``2 * threads`` ahead
    (which bounds the host memory in flight to a few tensors)."""
    if threads <= 1:
        for task in tasks:
            yield task()
        return

    with ThreadPoolExecutor(threads, thread_name_prefix="iopo-load") as ex:
        pending = collections.deque()
        for task in tasks:
            pending.append(ex.submit(task))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_read_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_model(path: str, mesh=None, *, seed: int = 0, config: ModelConfig | None = None,
               threads: int | None = None, progress: bool | None = None, **overrides):
    """Load a HF checkpoint directory (or hub id, when online) into a sharded :class:`Transformer`.

    ``overrides`` replace ModelConfig fields (param_dtype, dtype, remat, lora, ...).
    ``threads`` read tensors in parallel (default: the CPU count, at most 8); ``progress`` shows a
    bar (default: for checkpoints over 2 GB, on process 0).
    Returns ``(model, cfg)``. Missing, unexpected or mis-shaped tensors raise CheckpointError
    naming the key.
    """
    directory = resolve_checkpoint_dir(path)
    cfg = config or ModelConfig.from_hf(directory, **overrides)
    ckpt = Checkpoint(directory)
    try:
        graphdef, state, rest = abstract_model(cfg)
        wanted = expand_map(cfg)
        ignored = [re.compile(p) for p in IGNORED_HF_KEYS]
        expected_hf = {hf for hf, _ in wanted.values()}
        for k in ckpt.keys():
            if k in expected_hf or any(p.search(k) for p in ignored):
                continue
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise CheckpointError(f"{directory}: unexpected tensor '{k}' in the checkpoint (not part of a "
                                  f"{cfg.model_type} model with this config.json)")
        pure = nnx.to_pure_dict(state)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
        tasks, shardings, nbytes = [], [], []
        for path_, leaf in leaves:  # check everything before reading anything
            name = path_str(path_)
            sharding = None
            if mesh is not None:
                from jax.sharding import NamedSharding

                sharding = NamedSharding(mesh, param_spec(name, leaf.shape, mesh))
            shardings.append(sharding)
            nbytes.append(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize)
            if name.endswith(("lora_a", "lora_b")):
                tasks.append(lambda n=name, l=leaf, s=sharding: _split_host(_lora_init(n, l.shape, l.dtype, seed), l.dtype, s))
                continue
            if name not in wanted:
                raise CheckpointError(f"internal: parameter '{name}' has no entry in WEIGHT_MAP")
            hf_key, rule = wanted[name]
            st = ckpt.file_of(hf_key)
            if rule.to_ours is None:  # the header has the shape; after a transform only the read does
                _check_shape(st.shape(hf_key), leaf, hf_key, name, directory)

            def read_one(st=st, k=hf_key, r=rule, l=leaf, s=sharding, n=name):
                shape, shards = read_shards(st, k, l.dtype, s, r.to_ours)
                _check_shape(shape, l, k, n, directory)
                return shape, shards

            tasks.append(read_one)
        if progress is None:
            progress = ckpt.nbytes() > 2e9 and jax.process_index() == 0
        from tqdm import tqdm

        bar = tqdm(total=sum(nbytes), unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                   leave=False)
        arrays = []
        for (shape, shards), sharding, n in zip(_ordered(tasks, threads or default_read_threads()), shardings, nbytes):
            arrays.append(place_shards(shape, shards, sharding))
            bar.update(n)
        bar.close()
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, arrays))
        model = nnx.merge(graphdef, state, rest)
    finally:
        ckpt.close()
    return model, cfg


def _check_shape(shape, leaf, hf_key: str, name: str, directory: str):
    if tuple(shape) != tuple(leaf.shape):
        raise CheckpointError(
            f"{directory}: tensor '{hf_key}' has shape {tuple(shape)} but the model expects "
            f"{tuple(leaf.shape)} for '{name}' (config.json and weights disagree)")


def resolve_checkpoint_dir(path: str) -> str:
    """A local directory as is; otherwise a hub id downloaded with huggingface_hub (needs network)."""
    if os.path.isdir(path):
        return path
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None
    if not is_hub_id:
        raise CheckpointError(f"checkpoint directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"])
    except Exception as e:  # offline, unknown repo, ...
        raise CheckpointError(
            f"'{path}' is not a local directory and could not be fetched from the HF hub ({type(e).__name__}: {e}); "
            "download it on a machine with network and pass the directory") from e


# ----------------------------------------------------------------------------- export

def base_params(model: Transformer) -> dict[str, jax.Array]:
    """{our path: array} of the base (non-LoRA) parameters."""
    _, _, base, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    flat = {}
    jax.tree_util.tree_map_with_path(lambda p, x: flat.__setitem__(path_str(p), x), nnx.to_pure_dict(base))
    return flat


def export_hf(model: Transformer, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = 4 << 30,
              params: dict[str, jax.Array] | None = None, tokenizer_dir: str | None = None) -> str:
    """Write config.json + safetensors (sharded with an index above ``max_shard_bytes``).

    ``params`` overrides the model's base parameters (e.g. LoRA-merged weights). Only process 0
    writes. ``tokenizer_dir``: copy its tokenizer files beside the weights.
    """
    cfg = model.config
    params = params if params is not None else base_params(model)
    dt = np.dtype(dtype or cfg.param_dtype) if (dtype or cfg.param_dtype) != "bfloat16" else np.dtype(ml_dtypes.bfloat16)
    wanted = expand_map(cfg)
    items = []
    for ours, (hf_key, rule) in wanted.items():
        arr = params[ours]
        to_hf = rule.to_hf or (lambda a: a)
        items.append((hf_key, tuple(arr.shape), dt, (lambda a=arr, f=to_hf: f(host_value(a)))))
    if jax.process_index() != 0:
        for *_, produce in items:  # every process must take part in the gathers
            produce()
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    shards, cur, size = [], [], 0
    for it in items:
        n = math.prod(it[1]) * dt.itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    shards.append(cur)
    for stale in os.listdir(out_dir):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard)
            for name, shape, _, _ in shard:
                weight_map[name] = fname
                total += math.prod(shape) * dt.itemsize
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else str(dt)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def copy_tokenizer(src: str, dst: str):
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
