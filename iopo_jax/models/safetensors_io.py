"""The safetensors binary format: validated headers, positioned reads of sub-boxes, streamed writes.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets``; plus ``__metadata__``) and the raw C-order tensor bytes. :class:`SafetensorsFile` reads
one file (positioned reads of the rows/columns a device needs, or zero-copy views through a memory map),
:class:`Checkpoint` a directory of shards with its ``model.safetensors.index.json``, and
:func:`write_safetensors` streams tensors into one file with only one tensor on the host at a time.
Nothing here knows about models: the HF <-> iopo-jax weight map is :mod:`iopo_jax.models.weights`.

Example::

    write_safetensors("/tmp/t.safetensors", [("w", (2, 3), np.float32, lambda: np.ones((2, 3), np.float32))])
    st = SafetensorsFile("/tmp/t.safetensors")
    st.get("w")                                   # a (2, 3) float32 view
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

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


def aligned_empty(shape, dtype) -> np.ndarray:
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
        outs = [aligned_empty(tuple(b - a for a, b in box), dtype) for box in boxes]
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
