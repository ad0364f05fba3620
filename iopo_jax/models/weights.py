"""HF safetensors <-> iopo-jax parameters: one declarative map, sharded loading, HF export.

Loading reads each tensor straight from a memory map of the safetensors file and hands every
device only its own slice (``jax.make_array_from_callback`` with the parameter's
``NamedSharding``): the model is never gathered on one device and never held twice in host
memory. Export streams tensor by tensor into safetensors shards that ``transformers`` loads.

Example::

    model, cfg = load_model("/ckpt/Qwen2-7B-Instruct", mesh=make_mesh({"fsdp": -1}))
    export_hf(model, "/tmp/exported")          # config.json + model.safetensors(+index)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import re
import struct
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.sharding import param_spec, path_str

# ----------------------------------------------------------------------------- safetensors I/O
ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


class SafetensorsFile:
    """A read-only memory map of one .safetensors file with a validated header."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} exceeds file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        for name, e in header.items():
            try:
                dt = ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                lo, hi = (int(x) for x in e["data_offsets"])
            except KeyError as err:
                raise CheckpointError(f"{path}: tensor '{name}' has an unsupported or missing header field ({err})")
            if not 0 <= lo <= hi <= data_len or hi - lo != math.prod(shape) * dt.itemsize:
                raise CheckpointError(
                    f"{path}: corrupt safetensors file: tensor '{name}' bytes [{lo}, {hi}) do not fit its "
                    f"shape {shape} {e['dtype']} or the file's {data_len} data bytes (truncated file?)")
            self.entries[name] = (dt, shape, lo)
        self._file = open(path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        """A zero-copy read-only view of the tensor (pages are read on first touch)."""
        dt, shape, lo = self.entries[name]
        count = math.prod(shape)
        return np.frombuffer(self._mm, dtype=dt, count=count, offset=self.data_start + lo).reshape(shape)

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map closes when it is freed
                pass
        self._file.close()


class Checkpoint:
    """All tensors of a HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint directory not found: {directory}")
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not found:
                bins = [f for f in os.listdir(directory) if f.endswith(".bin")]
                hint = " (only PyTorch .bin files found: convert them to safetensors first)" if bins else ""
                raise CheckpointError(
                    f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")
            files, weight_map = found, None
        self.files = {f: SafetensorsFile(os.path.join(directory, f)) for f in files}
        self.where = {}
        for fname, st in self.files.items():
            for k in st.keys():
                self.where[k] = st
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise CheckpointError(f"{index}: tensor '{missing[0]}' listed in the index is in none of the shard files")

    def keys(self):
        return self.where.keys()

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.where[name].get(name)

    def nbytes(self) -> int:
        return sum(os.path.getsize(st.path) for st in self.files.values())

    def close(self):
        for st in self.files.values():
            st.close()


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict | None = None):
    """Stream tensors into one safetensors file. Each item: (name, shape, dtype, producer).

    Only one tensor is on the host at a time; the header is written first from shapes and dtypes.
    """
    items = list(tensors)
    header, offset = {}, 0
    for name, shape, dt, _ in items:
        n = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": NP_TO_ST[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dt, produce in items:
            arr = np.ascontiguousarray(produce(), dtype=dt)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"export: tensor '{name}' has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the map
@dataclasses.dataclass(frozen=True)
class WeightRule:
    """HF key <-> our parameter path; ``{i}`` is the layer index.

    ``to_ours``/``to_hf`` are the array transforms of each direction (identity here: our weights
    keep the HF layouts); they exist so that a family with another layout only edits this table.
    """

    hf: str
    ours: str
    when: Callable[[ModelConfig], bool] = lambda cfg: True
    to_ours: Callable[[np.ndarray], np.ndarray] = lambda a: a
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a


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
def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state) of the model without allocating any parameter."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    return nnx.split(abstract)


def _lora_init(path: str, shape, dtype, seed: int):
    """Deterministic LoRA init per parameter path (A uniform like PEFT, B zeros)."""
    if path.endswith("lora_b"):
        return np.zeros(shape, dtype)
    digest = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "little")
    key = jax.random.fold_in(jax.random.PRNGKey(seed), digest)
    bound = 1.0 / math.sqrt(shape[1])
    return np.asarray(jax.random.uniform(key, shape, jnp.float32, -bound, bound), dtype)


def _aligned_copy(src: np.ndarray, dtype) -> np.ndarray:
    """Copy into a fresh 64-byte aligned buffer.

    On CPU, XLA aliases host buffers that are 64-byte aligned instead of copying them again; numpy's
    large allocations are only 16-byte aligned. One copy is needed anyway: the memory map is closed
    after loading.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(src.shape)) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    out = buf[off:off + n].view(dtype).reshape(src.shape)
    np.copyto(out, src, casting="unsafe")
    return out


def _place(host_view: np.ndarray, dtype, sharding):
    """Put a host array (or memmap view) on devices, each device reading only its slice."""
    if sharding is None:
        return jnp.asarray(_aligned_copy(host_view, dtype))
    return jax.make_array_from_callback(host_view.shape, sharding, lambda index: _aligned_copy(host_view[index], dtype))


def load_model(path: str, mesh=None, *, seed: int = 0, config: ModelConfig | None = None, **overrides):
    """Load a HF checkpoint directory (or hub id, when online) into a sharded :class:`Transformer`.

    ``overrides`` replace ModelConfig fields (param_dtype, dtype, remat, lora, ...).
    Returns ``(model, cfg)``. Missing, unexpected or mis-shaped tensors raise CheckpointError
    naming the key.
    """
    directory = resolve_checkpoint_dir(path)
    cfg = config or ModelConfig.from_hf(directory, **overrides)
    ckpt = Checkpoint(directory)
    try:
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
        graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):  # RNG streams (LoRA dropout): cheap, make them for real
            rest = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1)),
                                             nnx.Not(nnx.Param)))()
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

        def fill(path, leaf):
            name = path_str(path)
            sharding = None
            if mesh is not None:
                from jax.sharding import NamedSharding

                sharding = NamedSharding(mesh, param_spec(name, leaf.shape, mesh))
            if name.endswith(("lora_a", "lora_b")):
                return _place(_lora_init(name, leaf.shape, leaf.dtype, seed), leaf.dtype, sharding)
            if name not in wanted:
                raise CheckpointError(f"internal: parameter '{name}' has no entry in WEIGHT_MAP")
            hf_key, rule = wanted[name]
            view = rule.to_ours(ckpt.get(hf_key))
            if tuple(view.shape) != tuple(leaf.shape):
                raise CheckpointError(
                    f"{directory}: tensor '{hf_key}' has shape {tuple(view.shape)} but the model expects "
                    f"{tuple(leaf.shape)} for '{name}' (config.json and weights disagree)")
            return _place(view, leaf.dtype, sharding)

        pure = jax.tree_util.tree_map_with_path(fill, pure)
        nnx.replace_by_pure_dict(state, pure)
        model = nnx.merge(graphdef, state, rest)
    finally:
        ckpt.close()
    return model, cfg


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
def _host(arr) -> np.ndarray:
    if jax.process_count() > 1 and not arr.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(jax.device_get(arr))


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
        items.append((hf_key, tuple(arr.shape), dt, (lambda a=arr, r=rule: r.to_hf(_host(a)))))
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
    import shutil

    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
