"""HF safetensors <-> iopo-jax parameters: one declarative map, sharded loading, HF export.

Loading builds the model abstractly (shapes only), then copies each tensor straight into the
64-byte aligned host buffers of the slices that this host's devices hold under the parameter's
``NamedSharding`` (row slices with positioned reads, ``os.preadv``; column slices and dtype casts
in one pass out of a memory map of the file), and places them with ``jax.make_array_from_callback``. The model is never gathered on one device and never
held twice in host memory; on CPU the devices alias the aligned buffers. Export streams tensor
by tensor into safetensors shards that ``transformers`` loads.

Example::

    model, cfg = load_model("/ckpt/Qwen2-7B-Instruct", mesh=make_mesh({"fsdp": -1}))
    export_hf(model, "/tmp/exported")          # config.json + model.safetensors(+index)
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import mmap
import os
import re
import struct
import threading
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.sharding import host_value, param_spec, path_str

# ----------------------------------------------------------------------------- safetensors I/O
ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


_MAX_READ = 1 << 30  # bytes per read call (Linux caps one read at ~2 GiB)


_MMAP_MIN_BYTES = 1 << 20


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is 64-byte aligned.

    On CPU, XLA aliases host buffers that are 64-byte aligned instead of copying them again;
    numpy's large allocations are only 16-byte aligned. Buffers of 1 MiB and more are their own
    anonymous memory maps (page aligned): numpy asks the kernel for transparent huge pages on
    large arrays, and faulting those in made loading 2-3x slower than the read itself on our VMs;
    MAP_POPULATE faults the pages in with one call. The map is unmapped when the last array (or
    device buffer aliasing it) is freed.
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    if n >= _MMAP_MIN_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
        mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
        return np.frombuffer(mm, np.uint8, n).view(dtype).reshape(shape)
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n].view(dtype).reshape(shape)


Box = tuple  # ((start, stop), ...) per dimension


def index_box(index, shape) -> Box:
    """A device index (a tuple of slices, as JAX gives them) as (start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    box = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided device index {index} is not supported")
        box.append((start, stop))
    return tuple(box)


class SafetensorsFile:
    """One .safetensors file with a validated header: positioned reads of sub-boxes of its tensors
    (:meth:`read`, what loading uses) or zero-copy views through a memory map (:meth:`get`)."""

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
        self._file = open(path, "rb", buffering=0)
        self._mm = None
        self._lock = threading.Lock()  # the lazy memory map and the seek + read fallback

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple:
        """The tensor's shape as stored (from the header)."""
        return tuple(self.entries[name][1])

    def get(self, name: str) -> np.ndarray:
        """A zero-copy read-only view of the tensor through a memory map (pages are read on first touch)."""
        dt, shape, lo = self.entries[name]
        with self._lock:
            if self._mm is None:
                self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(shape)
        return np.frombuffer(self._mm, dtype=dt, count=count, offset=self.data_start + lo).reshape(shape)

    def _pread(self, out: np.ndarray, offset: int, name: str):
        """Fill the C-contiguous ``out`` with the file's bytes from ``offset``."""
        mv = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(mv):
            chunk = mv[done:done + _MAX_READ]
            if hasattr(os, "preadv"):
                n = os.preadv(self._file.fileno(), [chunk], offset + done)
            else:  # no preadv (Windows): seek + read into the buffer
                with self._lock:
                    self._file.seek(offset + done)
                    n = self._file.readinto(chunk)
            if not n:
                raise CheckpointError(f"{self.path}: unexpected end of file while reading tensor '{name}' "
                                      "(file truncated after it was opened?)")
            done += n

    def read(self, name: str, boxes: list[Box], dtype) -> list[np.ndarray]:
        """Fresh 64-byte aligned ``dtype`` copies of sub-boxes of a tensor (see :func:`index_box`).

        A box of whole rows in the file's dtype is one positioned read (``preadv``) into its
        buffer. Other boxes (column slices, dtype casts) are copied out of a memory map of the
        file: one pass over the bytes they cover, no intermediate buffer.
        """
        dt, shape, lo = self.entries[name]
        dtype = np.dtype(dtype)
        outs = [_aligned_empty(tuple(b - a for a, b in box), dtype) for box in boxes]
        shape1 = shape or (1,)  # a scalar is one row
        row_bytes = math.prod(shape1[1:]) * dt.itemsize
        for box, out in zip(boxes, outs):
            box = box or ((0, 1),)
            if out.size == 0:
                continue
            if dt == dtype and all(box[d] == (0, shape1[d]) for d in range(1, len(shape1))):
                self._pread(out, self.data_start + lo + box[0][0] * row_bytes, name)
            else:
                src = self.get(name).reshape(shape1)[tuple(slice(a, b) for a, b in box)]
                np.copyto(out.reshape(src.shape), src, casting="unsafe")
        return outs

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

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise CheckpointError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self.where[name]

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)

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
            arr = np.asarray(produce(), dtype=dt, order="C")  # (ascontiguousarray would make a scalar 1-d)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"export: tensor '{name}' has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


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
    digest = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "little")
    key = jax.random.fold_in(jax.random.PRNGKey(seed), digest)
    bound = 1.0 / math.sqrt(shape[1])
    return np.asarray(jax.random.uniform(key, shape, jnp.float32, -bound, bound), dtype)


def _aligned_copy(src: np.ndarray, dtype) -> np.ndarray:
    """Copy into a fresh 64-byte aligned buffer (see :func:`_aligned_empty`)."""
    out = _aligned_empty(src.shape, dtype)
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
    from concurrent.futures import ThreadPoolExecutor

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
    import shutil

    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
