"""Tokenised datasets in flat numpy arrays, with an on-disk cache keyed by a content fingerprint.

    ds = TokenizedDataset.build(records, tok, kind="iopo", cutoff_len=2048, template="qwen",
                                cache_dir="~/.cache/iopo_jax/data", num_proc=2)

Layout (all numpy, memory-mapped when loaded from the cache): ``tokens`` (int32, every truncated
piece of every record back to back), ``piece_offsets`` (int64 [num_pieces+1]), ``group_offsets``
(int64 [N+1], the pieces of record i are ``group_offsets[i]:group_offsets[i+1]``), ``seq_lens``
(int32 [N, K], length of each of the K sequences of a record), ``truncated`` (bool [N]).
Sequences are assembled from pieces on demand (:meth:`TokenizedDataset.sequence`), so an IOPO group
stores its two prompts and two responses once, not four full sequences.

Cache: the fingerprint hashes the pipeline version, the kind, ``cutoff_len``, the tokenizer (its full
``tokenizer.json`` serialisation) and every rendered text piece (so the template and system prompt
are covered). ``cache_dir/<kind>-<fingerprint[:20]>/`` holds ``*.npy`` and ``meta.json``; it is written
atomically, so a second run with the same inputs loads it in milliseconds. With ``num_proc > 1`` the
texts are encoded with HF ``datasets`` ``Dataset.map(..., num_proc=...)``.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import pickle
import shutil
import tempfile
import time
from typing import Optional, Sequence, Union

import numpy as np

from data_pipeline.hashing import sha256_hex
from data_pipeline.templates import ChatTemplate, get_template
from data_pipeline.tokenization import (
    IGNORE_INDEX,
    NUM_SEQUENCES,
    SEQUENCE_NAMES,
    record_texts,
    sequence_pieces,
    truncated_lengths,
)

PIPELINE_VERSION = "data_pipeline/1"
_ARRAYS = ("tokens", "piece_offsets", "group_offsets", "seq_lens", "truncated")


def _remote(path) -> bool:
    """An object-store URI (``gs://...``, e.g. the data cache of a gs:// workdir), read/written via etils.epath."""
    return "://" in str(path)


def _exists(path) -> bool:
    if _remote(path):
        from etils import epath

        return epath.Path(path).exists()
    return os.path.isfile(path)
_TOK_FP: dict = {}


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, added tokens, normaliser)."""
    key = id(tok)
    hit = _TOK_FP.get(key)
    if hit is not None and hit[0] is tok:
        return hit[1]
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    h = hashlib.sha256()
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    elif hasattr(tok, "get_vocab"):  # slow tokenizer: vocabulary and special tokens
        h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    else:  # any other object with encode/__call__: its pickled state
        h.update(pickle.dumps(tok))
    h.update(type(tok).__name__.encode())
    fp = h.hexdigest()
    _TOK_FP[key] = (tok, fp)
    return fp


class _EncodeBatch:
    """Picklable map function for ``datasets.Dataset.map`` (batched)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, batch):
        return {"input_ids": self.tok(batch["text"], add_special_tokens=False)["input_ids"]}


def _encode_texts(tok, texts: list[str], num_proc: int, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Encode every text; returns (flat int32 ids, int64 lengths)."""
    if num_proc and num_proc > 1 and len(texts) > chunk:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.Dataset.from_dict({"text": texts})
            ds = ds.map(_EncodeBatch(tok), batched=True, batch_size=chunk, num_proc=num_proc,
                        remove_columns=["text"], keep_in_memory=True)
        finally:
            if bars:
                datasets.enable_progress_bars()
        col = ds.data.column("input_ids").combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int32)
        values = values[offsets[0]:offsets[-1]]
        return values, np.diff(offsets)
    lens = np.empty(len(texts), dtype=np.int64)
    parts = []
    for i in range(0, len(texts), chunk):
        ids = tok(texts[i:i + chunk], add_special_tokens=False)["input_ids"]
        lens[i:i + len(ids)] = [len(x) for x in ids]
        parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                 count=int(lens[i:i + len(ids)].sum())))
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat, lens


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate ``flat[starts[i]:starts[i]+lens[i]]`` for all i, vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int32)
    ends = np.cumsum(lens)
    base = np.repeat(starts - (ends - lens), lens)
    return flat[base + np.arange(total)]


class TokenizedDataset:
    """A tokenised, truncated training set (IOPO groups, DPO pairs or SFT conversations)."""

    def __init__(self, kind: str, arrays: dict, meta: dict, ids: Optional[Sequence[str]] = None,
                 source_index: Optional[np.ndarray] = None):
        self.kind = kind
        self.num_sequences = NUM_SEQUENCES[kind]
        self.tokens = arrays["tokens"]
        self.piece_offsets = arrays["piece_offsets"]
        self.group_offsets = arrays["group_offsets"]
        self.seq_lens = arrays["seq_lens"]
        self.truncated = arrays["truncated"]
        self.meta = meta
        n = len(self.seq_lens)
        self.ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        self.source_index = (np.arange(n, dtype=np.int64) if source_index is None
                             else np.asarray(source_index, dtype=np.int64))
        if len(self.ids) != n or len(self.source_index) != n:
            raise ValueError("ids / source_index do not match the number of records")
        self._layout_cache: dict = {}

    # ---- basic facts -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.seq_lens)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    @property
    def cutoff_len(self) -> Optional[int]:
        return self.meta["cutoff_len"]

    @property
    def sequence_names(self) -> tuple:
        return SEQUENCE_NAMES[self.kind]

    def group_lengths(self) -> np.ndarray:
        """Longest sequence of each record (what decides its length bucket)."""
        return self.seq_lens.max(axis=1) if len(self) else np.zeros(0, np.int32)

    def num_truncated(self) -> int:
        return int(np.count_nonzero(self.truncated))

    # ---- sequences ---------------------------------------------------------------------------
    def _layout(self, num_pieces: int):
        lay = self._layout_cache.get(num_pieces)
        if lay is None:
            lay = self._layout_cache[num_pieces] = sequence_pieces(self.kind, num_pieces)
        return lay

    def pieces(self, i: int) -> list[np.ndarray]:
        a, b = int(self.group_offsets[i]), int(self.group_offsets[i + 1])
        offs = self.piece_offsets[a:b + 1]
        return [self.tokens[offs[j]:offs[j + 1]] for j in range(b - a)]

    def sequence(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sequence ``k`` of record ``i`` (int32; labels -100 on prompts)."""
        pieces = self.pieces(i)
        layout = self._layout(len(pieces))[k]
        ids = np.concatenate([pieces[j] for j, _ in layout]).astype(np.int32, copy=False)
        labels = np.concatenate(
            [pieces[j] if resp else np.full(len(pieces[j]), IGNORE_INDEX, np.int32) for j, resp in layout]
        ).astype(np.int32, copy=False)
        return ids, labels

    def example(self, i: int) -> dict:
        """``{name: {"input_ids", "labels"}}`` of record ``i`` as lists (for inspection and tests)."""
        out = {}
        for k, name in enumerate(self.sequence_names):
            ids, labels = self.sequence(i, k)
            out[name] = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        return out

    def select(self, indices: Sequence[int]) -> "TokenizedDataset":
        """A new dataset with the given records (arrays are copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        go = self.group_offsets
        npieces = go[idx + 1] - go[idx]
        piece_idx = _gather(np.arange(len(self.piece_offsets) - 1, dtype=np.int64), go[idx], npieces)
        plens = np.diff(self.piece_offsets)[piece_idx]
        tokens = _gather(self.tokens, self.piece_offsets[piece_idx], plens)
        arrays = {
            "tokens": tokens,
            "piece_offsets": np.concatenate([[0], np.cumsum(plens)]).astype(np.int64),
            "group_offsets": np.concatenate([[0], np.cumsum(npieces)]).astype(np.int64),
            "seq_lens": np.asarray(self.seq_lens[idx]),
            "truncated": np.asarray(self.truncated[idx]),
        }
        meta = dict(self.meta, fingerprint=sha256_hex(self.fingerprint + ":" + ",".join(map(str, idx.tolist()))),
            num_records=len(idx))
        return TokenizedDataset(self.kind, arrays, meta, [self.ids[i] for i in idx], self.source_index[idx])

    # ---- building and caching ---------------------------------------------------------------
    @classmethod
    def build(
        cls,
        records: Sequence[dict],
        tok,
        kind: str,
        cutoff_len: Optional[int],
        template: Union[str, ChatTemplate] = "qwen",
        default_system: Optional[str] = None,
        cache_dir: Optional[str] = None,
        num_proc: int = 1,
        source_index: Optional[Sequence[int]] = None,
        pad_id: Optional[int] = None,
    ) -> "TokenizedDataset":
        """Tokenise and truncate normalised records (``load_records`` output), or load them from the cache."""
        if kind not in NUM_SEQUENCES:
            raise ValueError(f"cannot tokenise kind {kind!r} for training; expected iopo, dpo or sft")
        if cutoff_len is not None and cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
        tpl = get_template(template, default_system)
        if pad_id is None:
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_id")
        t0 = time.perf_counter()
        texts_per_rec = [record_texts(kind, r, tpl) for r in records]
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{PIPELINE_VERSION}|{kind}|{cutoff_len}|{pad_id}|{tokenizer_fingerprint(tok)}|".encode())
        for texts in texts_per_rec:
            for t in texts:
                h.update(t.encode("utf-8"))
                h.update(b"\x00")
            h.update(b"\x01")
        fp = h.hexdigest()
        ids = [r.get("id", str(i)) for i, r in enumerate(records)]
        path = None
        if cache_dir:
            path = os.path.join(cache_dir if _remote(cache_dir) else os.path.expanduser(cache_dir), f"{kind}-{fp[:20]}")
            if _exists(os.path.join(path, "meta.json")):
                ds = cls.load(path, ids=ids, source_index=source_index)
                if ds.fingerprint == fp:
                    ds.meta["cache_hit"] = True
                    ds.meta["build_seconds"] = time.perf_counter() - t0
                    return ds
        npieces = np.array([len(t) for t in texts_per_rec], dtype=np.int64)
        flat_texts = [t for texts in texts_per_rec for t in texts]
        flat, lens = _encode_texts(tok, flat_texts, num_proc)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(lens) else lens
        group_offsets = np.concatenate([[0], np.cumsum(npieces)]).astype(np.int64)
        new_lens = np.empty_like(lens)
        K = NUM_SEQUENCES[kind]
        seq_lens = np.zeros((len(records), K), dtype=np.int32)
        for i in range(len(records)):
            a, b = group_offsets[i], group_offsets[i + 1]
            nl = truncated_lengths(kind, lens[a:b], cutoff_len)
            new_lens[a:b] = nl
            for k, layout in enumerate(sequence_pieces(kind, int(b - a))):
                seq_lens[i, k] = sum(nl[j] for j, _ in layout)
        truncated = np.zeros(len(records), dtype=bool)
        if len(records):
            cut = (new_lens < lens).astype(np.int64)
            truncated = np.add.reduceat(cut, group_offsets[:-1]) > 0 if len(cut) else truncated
        arrays = {
            "tokens": _gather(flat, starts, new_lens).astype(np.int32),
            "piece_offsets": np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64),
            "group_offsets": group_offsets,
            "seq_lens": seq_lens,
            "truncated": truncated,
        }
        meta = {
            "version": PIPELINE_VERSION,
            "kind": kind,
            "fingerprint": fp,
            "cutoff_len": cutoff_len,
            "template": tpl.name,
            "pad_id": int(pad_id),
            "num_records": len(records),
            "num_tokens_untruncated": int(lens.sum()),
        }
        ds = cls(kind, arrays, meta, ids, source_index)
        if path:
            ds.save(path)
        ds.meta["cache_hit"] = False
        ds.meta["build_seconds"] = time.perf_counter() - t0
        return ds

    def save(self, path: str) -> None:
        """Write the arrays and meta.json to ``path`` atomically (a temporary dir renamed into place)."""
        if _remote(path):  # object store (gs:// workdir): one object per array, meta.json last (the marker)
            from etils import epath

            d = epath.Path(path)
            d.mkdir(parents=True, exist_ok=True)
            for name in _ARRAYS:
                buf = io.BytesIO()
                np.save(buf, np.asarray(getattr(self, name)))
                (d / (name + ".npy")).write_bytes(buf.getvalue())
            meta = {k: v for k, v in self.meta.items() if k not in ("cache_hit", "build_seconds")}
            (d / "meta.json").write_text(json.dumps(meta, indent=1))
            return
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            for name in _ARRAYS:
                np.save(os.path.join(tmp, name + ".npy"), np.asarray(getattr(self, name)))
            meta = {k: v for k, v in self.meta.items() if k not in ("cache_hit", "build_seconds")}
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str, ids=None, source_index=None, mmap: bool = True) -> "TokenizedDataset":
        if _remote(path):
            from etils import epath

            d = epath.Path(path)
            meta = json.loads((d / "meta.json").read_text())
            if meta.get("version") != PIPELINE_VERSION:
                raise ValueError(f"{path}: cache written by {meta.get('version')}, expected {PIPELINE_VERSION}")
            arrays = {n: np.load(io.BytesIO((d / (n + ".npy")).read_bytes())) for n in _ARRAYS}
            return cls(meta["kind"], arrays, meta, ids, source_index)
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != PIPELINE_VERSION:
            raise ValueError(f"{path}: cache written by {meta.get('version')}, expected {PIPELINE_VERSION}")
        arrays = {n: np.load(os.path.join(path, n + ".npy"), mmap_mode="r" if mmap else None) for n in _ARRAYS}
        return cls(meta["kind"], arrays, meta, ids, source_index)
