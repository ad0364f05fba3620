"""Static-shape, resumable batch iterators over a :class:`~data_pipeline.dataset.TokenizedDataset`.

    it = BatchIterator(ds, batch_size=8, seed=0, num_epochs=3)
    for batch in it: ...
    state = it.get_state()          # small JSON-serialisable dict, save it with the checkpoint
    it2 = BatchIterator(ds, batch_size=8, seed=0, num_epochs=3); it2.set_state(state)  # same batches follow

Each batch is a dict of numpy arrays with R = batch_size * K rows (K = 4 for IOPO, 2 for DPO, 1 for
SFT; row ``K*g + k`` is sequence k of group g, in the order of :data:`~data_pipeline.tokenization.SEQUENCE_NAMES`):

- ``input_ids`` [R, L] int32, right padded with the tokenizer's pad id;
- ``labels`` [R, L] int32, the token id on response tokens, -100 elsewhere (not shifted);
- ``segment_ids`` [R, L] int32: 0 = padding, 1 = the sequence (packed SFT: 1, 2, 3, ... per packed sequence);
- ``attention_mask`` [R, L] int32: ``segment_ids > 0``;
- ``positions`` [R, L] int32: 0, 1, 2, ... restarting at every packed sequence (0 on padding);
- ``valid`` [R] bool: False on filler rows (only in a padded last batch, ``drop_last=False``);
- ``example_index`` [batch_size] int64: the record's index in the full input (``source_index``), -1 for
  filler (not in packed batches).

Shared-prompt packing (``share_prompt=True``, IOPO and DPO): each prompt is written once with both of its
answers, ``[x | y_a | y_b]``, so a group takes K/2 rows instead of K (IOPO: ``[x1 | y1 | y2]`` holds
sequences 0 and 1, ``[x2 | y2 | y1]`` sequences 2 and 3; DPO: ``[x | chosen | rejected]``). Segment ids are
1, 2, 3 for x, y_a, y_b; ``prefix_ids`` is 1 on both answers (they also see segment 1, never each other);
y_b's positions continue from the end of x, as in the unpacked sequence. There are no ``labels``: the
scored tokens are listed per row, front-packed, in ``score_positions`` (the hidden position that predicts
the token: y_b's first token is predicted from x's last token), ``score_targets`` (token id, -100 on empty
slots) and ``score_sequence`` (0 = the sequence x+y_a, 1 = x+y_b); sequence s of row r is sequence
``2 * r + s`` of the unpacked batch. ``valid`` is per row.

L is the smallest length bucket that holds the batch's longest sequence (buckets: multiples of
``bucket_step`` = 128 up to the cutoff, or an explicit list), so a whole run compiles at most
``len(buckets)`` shapes. Packed SFT rows always have the largest bucket's length.

Order: every epoch is a permutation of the records drawn from ``(seed, epoch)``; the state is
``{"epoch", "step"}`` plus consistency checks, and restoring it replays exactly the batches an
uninterrupted iterator yields. With several hosts each iterator holds only its host's shard
(see :func:`data_pipeline.pipeline.build_data`) and ``allgather`` makes every host agree on the number of
batches and on each batch's length bucket (one collective per epoch).

Column order (``columns`` / ``column_ids``, what :func:`~data_pipeline.pipeline.build_data` uses for
unpacked training data): the records are dealt once into as many *columns* as a global batch has units
(groups / pairs / conversations); every epoch each column is shuffled on its own, drawn from
``(seed, epoch, column)``, and batch b takes the b-th record of every column, in column order. A host owns a
contiguous range of columns, so the global batch (the hosts' batches concatenated in process order) is the
same for any number of hosts, row for row.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from data_pipeline.dataset import TokenizedDataset
from data_pipeline.tokenization import IGNORE_INDEX, LAYOUTS

STATE_VERSION = 1


def make_buckets(max_len: int, step: int = 128, buckets: Optional[Sequence[int]] = None) -> np.ndarray:
    """Sorted length buckets: ``buckets`` if given, else multiples of ``step`` up to ``max_len`` rounded up."""
    if buckets:
        b = np.unique(np.asarray(sorted(int(x) for x in buckets), dtype=np.int64))
        if b[0] < 1:
            raise ValueError(f"length buckets must be positive, got {list(buckets)}")
        return b
    if step < 1:
        raise ValueError(f"bucket_step must be >= 1, got {step}")
    top = max(step, -(-int(max_len) // step) * step)
    return np.arange(step, top + 1, step, dtype=np.int64)


def bucket_for(length, buckets: np.ndarray):
    """Smallest bucket >= length (vectorised). Raises if a length exceeds the largest bucket."""
    length = np.asarray(length)
    idx = np.searchsorted(buckets, length, side="left")
    if np.any(idx >= len(buckets)):
        raise ValueError(
            f"a sequence of {int(np.max(length))} tokens is longer than the largest length bucket "
            f"{int(buckets[-1])}; raise the buckets or lower cutoff_len")
    return buckets[idx]


def pack_rows(lengths: np.ndarray, order: np.ndarray, row_len: int, window: int = 8) -> list[list[int]]:
    """Deterministic first-fit packing of examples (in ``order``) into rows of ``row_len`` tokens.

    At most ``window`` rows are open at once; when a sequence fits none of them, the oldest open row is
    closed. Rows come out in the order they are closed.
    """
    rows: list[list[int]] = []
    open_rows: list[list] = []  # [space_left, [indices]]
    for i in order:
        n = int(lengths[i])
        if n > row_len:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {row_len}")
        for r in open_rows:
            if r[0] >= n:
                r[0] -= n
                r[1].append(int(i))
                break
        else:
            if len(open_rows) >= window:
                rows.append(open_rows.pop(0)[1])
            open_rows.append([row_len - n, [int(i)]])
    rows.extend(r[1] for r in open_rows)
    return rows


def shared_prompt_lengths(dataset: TokenizedDataset) -> np.ndarray:
    """Per record, the longest shared-prompt row ``len(x) + len(y_a) + len(y_b)`` (IOPO / DPO)."""
    n = len(dataset)
    if n == 0:
        return np.zeros(0, np.int64)
    plen = np.diff(dataset.piece_offsets)
    layout = LAYOUTS[dataset.kind]
    npieces = 1 + max(max(p) for p in layout)
    start = np.asarray(dataset.group_offsets[:-1])
    if np.any(np.diff(dataset.group_offsets) != npieces):
        raise ValueError(f"{dataset.kind} records must have {npieces} pieces each")
    p = plen[start[:, None] + np.arange(npieces)[None, :]]  # [n, pieces]
    rows = [p[:, layout[2 * j][0]] + p[:, layout[2 * j][1]] + p[:, layout[2 * j + 1][1]]
            for j in range(len(layout) // 2)]
    return np.max(np.stack(rows, 1), axis=1).astype(np.int64)


def shared_prompt_rows(rows: Sequence, L: int, pad_id: int) -> dict:
    """Shared-prompt rows ``[x | y_a | y_b]`` (see the module docstring) from ``(x, y_a, y_b)`` token arrays
    (``None`` = a filler row): input_ids, segment_ids, prefix_ids, positions, attention_mask, score_positions,
    score_targets, score_sequence ``[R, L]`` and valid ``[R]``."""
    R = len(rows)
    out = {name: np.zeros((R, L), np.int32) for name in (
        "input_ids", "segment_ids", "positions", "prefix_ids", "score_positions", "score_sequence")}
    out["input_ids"][:] = pad_id
    out["score_targets"] = np.full((R, L), IGNORE_INDEX, np.int32)
    valid = np.zeros((R,), bool)
    for r, row in enumerate(rows):
        if row is None:
            continue
        x, ya, yb = (np.asarray(p, np.int32) for p in row)
        nx, na, nb = len(x), len(ya), len(yb)
        if nx + na + nb > L:
            raise ValueError(f"shared-prompt row {r}: {nx} + {na} + {nb} tokens do not fit length {L}")
        out["input_ids"][r, :nx + na + nb] = np.concatenate([x, ya, yb])
        out["segment_ids"][r, :nx], out["segment_ids"][r, nx:nx + na] = 1, 2
        out["segment_ids"][r, nx + na:nx + na + nb] = 3
        out["prefix_ids"][r, nx:nx + na + nb] = 1
        out["positions"][r, :nx + na] = np.arange(nx + na)
        out["positions"][r, nx + na:nx + na + nb] = nx + np.arange(nb)
        # the hidden position that predicts each answer token: the previous token of its own sequence
        src_a = nx - 1 + np.arange(na)
        src_b = np.concatenate([[nx - 1], nx + na + np.arange(max(nb - 1, 0))])[:nb]
        src = np.concatenate([src_a, src_b])
        tgt = np.concatenate([ya, yb])
        seq = np.concatenate([np.zeros(na, np.int32), np.ones(nb, np.int32)])
        keep = src >= 0  # an empty prompt leaves an answer's first token unpredicted, as unpacked
        n = int(keep.sum())
        out["score_positions"][r, :n], out["score_targets"][r, :n] = src[keep], tgt[keep]
        out["score_sequence"][r, :n] = seq[keep]
        valid[r] = True
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    out["valid"] = valid
    return out


class _Plan:
    __slots__ = ("epoch", "batches", "lengths")

    def __init__(self, epoch, batches, lengths):
        self.epoch, self.batches, self.lengths = epoch, batches, lengths


class BatchIterator:
    """Resumable iterator of static-shape numpy batches (see the module docstring).

    Args:
      dataset: the tokenised records (one host's shard).
      batch_size: groups / pairs / conversations per batch on this host (packed SFT: rows).
      seed: shuffling seed. shuffle: False keeps the dataset order (evaluation).
      num_epochs: epochs to yield; None = forever.
      drop_last: drop a last incomplete batch (training) or pad it with filler rows (``valid`` False).
      buckets / bucket_step: length buckets (default: multiples of 128 up to the cutoff).
      pack: pack SFT conversations into rows of the largest bucket (segment ids 1, 2, ...).
      pack_window: open rows considered by the first-fit packer.
      allgather: ``f(np.ndarray) -> np.ndarray`` stacking every host's array on a new axis 0
        (e.g. ``jax.experimental.multihost_utils.process_allgather``); None on one host.
      state_key: identifies the data in :meth:`get_state` (default: this shard's fingerprint); give the
        same key on every host (``build_data`` does) so that a state saved on one host restores on all.
      columns: column order (see the module docstring): the global column of every record of ``dataset``
        (records of one column in the same relative order on any number of hosts).
      column_ids: this host's columns, in row order (``batch_size`` of them); with ``columns``.
      batches_per_epoch: with ``columns``: batches per epoch, the same on every host (``drop_last``: the
        shortest column over all hosts; else the longest, shorter columns yield filler units).
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: Optional[int] = 1,
        drop_last: bool = True,
        buckets: Optional[Sequence[int]] = None,
        bucket_step: int = 128,
        pack: bool = False,
        pack_window: int = 8,
        allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        state_key: Optional[str] = None,
        share_prompt: bool = False,
        columns: Optional[Sequence[int]] = None,
        column_ids: Optional[Sequence[int]] = None,
        batches_per_epoch: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pack and dataset.kind != "sft":
            raise ValueError(f"packing is only for SFT data, not {dataset.kind}; set pack=False")
        if share_prompt and dataset.kind not in ("iopo", "dpo"):
            raise ValueError(f"share_prompt packs IOPO groups and DPO pairs, not {dataset.kind}; set it False")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.drop_last = bool(drop_last)
        self.pack = bool(pack)
        self.pack_window = int(pack_window)
        self.allgather = allgather
        self.state_key = state_key or dataset.fingerprint[:16]
        self.K = dataset.num_sequences
        self.share_prompt = bool(share_prompt)
        self._lengths = shared_prompt_lengths(dataset) if self.share_prompt else dataset.group_lengths()
        max_len = dataset.cutoff_len or (int(dataset.group_lengths().max()) if len(dataset) else bucket_step)
        if self.share_prompt and len(self._lengths):  # a packed row holds a prompt and two answers
            max_len = max(max_len, int(self._lengths.max()))
        self.buckets = make_buckets(max_len, bucket_step, buckets)
        if len(self._lengths):
            bucket_for(self._lengths.max(), self.buckets)  # fail fast on a too-long sequence
        self._members = None  # column order: this host's record indices per column, in row order
        if columns is not None or column_ids is not None:
            if columns is None or column_ids is None or batches_per_epoch is None:
                raise ValueError("column order needs columns, column_ids and batches_per_epoch together")
            if pack:
                raise ValueError("column order is not available for packed rows; set pack=False or columns=None")
            columns = np.asarray(columns, dtype=np.int64)
            if columns.shape != (len(dataset),):
                raise ValueError(f"columns has {columns.shape[0] if columns.ndim else 0} entries for "
                                 f"{len(dataset)} records")
            self.column_ids = [int(c) for c in column_ids]
            if len(self.column_ids) != self.batch_size:
                raise ValueError(f"column_ids lists {len(self.column_ids)} columns for batch_size {self.batch_size}")
            stray = sorted(set(columns.tolist()) - set(self.column_ids))
            if stray:
                raise ValueError(f"records of columns {stray[:5]} are not in column_ids {self.column_ids}")
            if batches_per_epoch < 0:
                raise ValueError(f"batches_per_epoch must be >= 0, got {batches_per_epoch}")
            self._members = [np.flatnonzero(columns == c) for c in self.column_ids]
            self._column_batches = int(batches_per_epoch)
        self._epoch = 0
        self._step = 0
        self._plan: Optional[_Plan] = None

    # ---- planning ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def _column_batches_for(self, epoch: int) -> list:
        nb = self._column_batches
        cols = []
        for c, members in zip(self.column_ids, self._members):
            if self.shuffle:
                members = members[np.random.default_rng([self.seed, epoch, c]).permutation(len(members))]
            cols.append(members)
        return [[[int(m[b])] if b < len(m) else [] for m in cols] for b in range(nb)]

    def _make_plan(self, epoch: int) -> _Plan:
        B = self.batch_size
        if self._members is not None:
            batches = self._column_batches_for(epoch)
            return _Plan(epoch, batches, self._bucket_lengths(batches))
        order = self._order(epoch)
        if self.pack:
            rows = pack_rows(self._lengths, order, int(self.buckets[-1]), self.pack_window)
            units = rows
        else:
            units = [[int(i)] for i in order]
        nb = len(units) // B if self.drop_last else -(-len(units) // B)
        if self.allgather is not None:  # all hosts must agree on the number of batches
            counts = np.asarray(self.allgather(np.array([nb], dtype=np.int64))).reshape(-1)
            nb = int(counts.min() if self.drop_last else counts.max())
        batches = []
        for b in range(nb):
            chunk = units[b * B:(b + 1) * B]
            chunk = chunk + [[]] * (B - len(chunk))  # filler
            batches.append(chunk)
        if self.pack:
            lengths = np.full(nb, int(self.buckets[-1]), dtype=np.int64)
        else:
            lengths = self._bucket_lengths(batches)
        return _Plan(epoch, batches, lengths)

    def _bucket_lengths(self, batches) -> np.ndarray:
        """The length bucket of each batch (unpacked rows), the largest over all hosts when there are several."""
        nb = len(batches)
        lengths = np.empty(nb, dtype=np.int64)
        for b, chunk in enumerate(batches):
            idx = [u[0] for u in chunk if u]
            lengths[b] = bucket_for(self._lengths[idx].max(), self.buckets) if idx else self.buckets[0]
        if self.allgather is not None and nb:
            lengths = np.asarray(self.allgather(lengths)).reshape(-1, nb).max(axis=0)
        return lengths

    def _plan_for(self, epoch: int) -> _Plan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = self._make_plan(epoch)
        return self._plan

    @property
    def steps_per_epoch(self) -> int:
        """Batches in the current epoch (the same for every epoch unless packing)."""
        return len(self._plan_for(self._epoch).batches)

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless iterator (num_epochs=None) has no length")
        if self.pack:
            return sum(len(self._make_plan(e).batches) for e in range(self.num_epochs))
        return self.steps_per_epoch * self.num_epochs

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            plan = self._plan_for(self._epoch)
            if self._step < len(plan.batches):
                break
            if not plan.batches and (self.num_epochs is None):
                raise ValueError("the dataset is too small for one batch; lower batch_size or set drop_last=False")
            self._epoch += 1
            self._step = 0
        batch = self._assemble(plan.batches[self._step], int(plan.lengths[self._step]))
        self._step += 1
        return batch

    def _assemble(self, chunk: list, L: int) -> dict:
        if self.share_prompt:
            return self._assemble_shared(chunk, L)
        ds, K = self.dataset, self.K
        R = len(chunk) * K if not self.pack else len(chunk)
        input_ids = np.full((R, L), ds.pad_id, dtype=np.int32)
        labels = np.full((R, L), IGNORE_INDEX, dtype=np.int32)
        segment_ids = np.zeros((R, L), dtype=np.int32)
        positions = np.zeros((R, L), dtype=np.int32)
        valid = np.zeros((R,), dtype=bool)
        if self.pack:
            for r, row in enumerate(chunk):
                pos = 0
                for s, i in enumerate(row, start=1):
                    ids, lab = ds.sequence(i, 0)
                    n = len(ids)
                    input_ids[r, pos:pos + n] = ids
                    labels[r, pos:pos + n] = lab
                    segment_ids[r, pos:pos + n] = s
                    positions[r, pos:pos + n] = np.arange(n, dtype=np.int32)
                    pos += n
                valid[r] = bool(row)
            return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids,
                    "attention_mask": (segment_ids > 0).astype(np.int32), "positions": positions,
                    "valid": valid}
        example_index = np.full((len(chunk),), -1, dtype=np.int64)
        ar = np.arange(L, dtype=np.int32)
        for g, unit in enumerate(chunk):
            if not unit:
                continue
            i = unit[0]
            example_index[g] = ds.source_index[i]
            for k in range(K):
                r = g * K + k
                ids, lab = ds.sequence(i, k)
                n = len(ids)
                input_ids[r, :n] = ids
                labels[r, :n] = lab
                segment_ids[r, :n] = 1
                positions[r, :n] = ar[:n]
                valid[r] = True
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids,
                "attention_mask": segment_ids.copy(), "positions": positions, "valid": valid,
                "example_index": example_index}

    def _assemble_shared(self, chunk: list, L: int) -> dict:
        ds = self.dataset
        rpg = self.K // 2  # rows per group
        layout = LAYOUTS[ds.kind]
        rows, example_index = [], np.full((len(chunk),), -1, dtype=np.int64)
        for g, unit in enumerate(chunk):
            if not unit:
                rows += [None] * rpg
                continue
            example_index[g] = ds.source_index[unit[0]]
            pieces = ds.pieces(unit[0])
            rows += [(pieces[layout[2 * j][0]], pieces[layout[2 * j][1]], pieces[layout[2 * j + 1][1]])
                     for j in range(rpg)]
        out = shared_prompt_rows(rows, L, ds.pad_id)
        out["example_index"] = example_index
        return out

    # ---- state -------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Small JSON-serialisable position: restoring it replays the same following batches."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self._epoch),
            "step": int(self._step),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_records": len(self.dataset),
            "fingerprint": self.state_key,
            "pack": self.pack,
            "share_prompt": self.share_prompt,
            **({"order": "columns"} if self._members is not None else {}),
        }

    def set_state(self, state: dict) -> None:
        """Restore a position from :meth:`get_state` (raises if it belongs to other data or settings)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an iterator state of version {STATE_VERSION}: {state!r}")
        mine = self.get_state()
        for key in ("seed", "batch_size", "num_records", "fingerprint", "pack", "share_prompt", "order"):
            default = {"share_prompt": False, "order": "permutation"}.get(key)
            if state.get(key, default) != mine.get(key, default):
                raise ValueError(
                    f"iterator state does not match this data pipeline: {key} is {state.get(key, default)!r} in "
                    f"the state but {mine.get(key, default)!r} here (different data, tokenizer, cutoff or batch settings?)")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or step < 0:
            raise ValueError(f"bad iterator position epoch={epoch} step={step}")
        self._epoch, self._step = epoch, step
        self._plan = None

    def shapes(self) -> list:
        """Every distinct [rows, L] shape this iterator can yield (one per bucket)."""
        rows = self.batch_size * (1 if self.pack else (self.K // 2 if self.share_prompt else self.K))
        if self.pack:
            return [(rows, int(self.buckets[-1]))]
        return [(rows, int(b)) for b in self.buckets]
