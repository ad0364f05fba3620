"""One call from files to train / validation iterators: what the trainer uses.

    from data_pipeline import DataConfig, build_data
    data = build_data(DataConfig(kind="iopo", train_files=["data_pipeline/demo_data/iopo_train.json"],
                                 val_fraction=0.1, cutoff_len=512, batch_size=8), tokenizer)
    for batch in data.train: ...        # static-shape numpy dicts (see data_pipeline.batching)
    print(data.summary_text())

Steps: read + validate (``skip_invalid`` counts bad records instead of raising) -> hold out a
validation split (by fraction or count, seeded) -> keep this host's shard -> tokenise and truncate
(cached on disk) -> :class:`~data_pipeline.batching.BatchIterator`. ``batch_size`` is global (groups per
step over all hosts); each host yields ``batch_size / process_count``.

Every host reads the files (to split them identically) but tokenises only its shard. Training records
(unpacked) are dealt, in a seeded order, into ``batch_size`` columns; host h owns columns
``[h * batch_size / P, (h + 1) * batch_size / P)``, and every epoch each column is shuffled on its own (see
the column order of :mod:`data_pipeline.batching`). The global batch of every step is therefore the same,
row for row, on 1, 2 or 8 hosts; each epoch leaves out ``N mod batch_size`` records, a different draw
per epoch. Packed SFT rows and validation records go to host ``i % process_count`` (packed training shards
are cut to equal size); their order depends on the number of hosts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import numpy as np

from data_pipeline.batching import BatchIterator
from data_pipeline.dataset import TokenizedDataset, tokenizer_fingerprint
from data_pipeline.errors import InvalidReport
from data_pipeline.readers import TRAIN_KINDS, load_records
from data_pipeline.schema import from_mapping, parse_list


@dataclasses.dataclass
class DataConfig:
    """Data settings: the ``data`` section of the training configs, field for field, with the same defaults
    (``configs/base.py`` documents each field).

    kind: iopo | dpo | sft.
    train_files: files, directories, globs or ``hf:owner/name`` ids.
    val_files: explicit validation files; when empty, ``val_fraction`` / ``val_count`` of the
      training records are held out (the paper holds out 10%); when given, those two are not used.
    skip_invalid: skip bad records (counted in the summary) instead of raising.
    template: chat template, ``qwen`` or ``llama3``. system: overrides the template's default system prompt.
    cutoff_len: joint truncation length (docs/truncation.md).
    batch_size: global groups per step. eval_batch_size: defaults to batch_size.
    seed: shuffling and split seed. num_epochs: None = forever.
    buckets / bucket_step: length buckets (default: multiples of bucket_step up to cutoff_len).
    pack: pack SFT conversations into full rows (segment ids). drop_last: for training.
    share_prompt: IOPO / DPO: each prompt once with both answers in one row (see data_pipeline.batching).
    cache_dir: tokenisation cache ("" = none here; training runs put it under <workdir>/data_cache).
    num_proc: processes for tokenising.
    """

    kind: str = "iopo"
    train_files: Sequence[str] = ()
    val_files: Sequence[str] = ()
    val_fraction: float = 0.1
    val_count: int = 0
    skip_invalid: bool = False
    template: str = "qwen"
    system: Optional[str] = None
    cutoff_len: int = 6000
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    seed: int = 0
    num_epochs: Optional[int] = 3
    bucket_step: int = 128
    buckets: Sequence[int] = ()
    pack: bool = False
    share_prompt: bool = False
    drop_last: bool = True
    cache_dir: str = ""
    num_proc: int = 1

    def __post_init__(self):
        self.train_files = parse_list(self.train_files, name="config.data.train_files")
        self.val_files = parse_list(self.val_files, name="config.data.val_files")
        self.buckets = parse_list(self.buckets, int, name="config.data.buckets")

    @classmethod
    def from_mapping(cls, m: Any) -> "DataConfig":
        """From a dict or the ``data`` section of a config (unknown keys raise, naming them)."""
        return from_mapping(cls, m, "data")


def split_validation(records: Sequence, fraction: float = 0.0, count: int = 0, seed: int = 0):
    """Hold out ``count`` records (or ``round(fraction * N)``, at least 1 when fraction > 0), seeded.

    Returns ``(train, val, train_index, val_index)``; the index arrays point into ``records`` and keep
    the original order inside each split.
    """
    n = len(records)
    if count and fraction:
        raise ValueError("give val_fraction or val_count, not both")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = int(count) if count else (max(1, int(round(fraction * n))) if fraction > 0 else 0)
    if n_val < 0 or (n_val and n_val >= n):
        raise ValueError(f"cannot hold out {n_val} of {n} records for validation")
    perm = np.random.default_rng([int(seed), 7919]).permutation(n)
    val_idx = np.sort(perm[:n_val]).astype(np.int64)
    train_idx = np.sort(perm[n_val:]).astype(np.int64)
    return [records[i] for i in train_idx], [records[i] for i in val_idx], train_idx, val_idx


def shard_indices(n: int, process_index: int, process_count: int, equal: bool) -> np.ndarray:
    """Indices of host ``process_index``'s records: ``i % process_count == process_index``.

    ``equal`` cuts every shard to ``n // process_count`` (training: every host takes the same number of steps).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    idx = np.arange(process_index, n, process_count, dtype=np.int64)
    if equal:
        idx = idx[: n // process_count]
    return idx


def column_shard(n: int, batch_size: int, process_index: int, process_count: int, seed: int = 0,
                 drop_last: bool = True):
    """Host ``process_index``'s training records under the column order (see the module docstring).

    The ``n`` records are dealt in a seeded order (record i has rank ``perm[i]``) into ``batch_size``
    columns (column = rank mod batch_size); this host owns a contiguous block of ``batch_size /
    process_count`` columns. Returns ``(indices, columns, column_ids, batches_per_epoch)``: this host's
    record indices (sorted by column, then rank: the same relative order on any number of hosts), the
    column of each of them, this host's column ids, and the batches per epoch (the shortest column with
    ``drop_last``, else the longest).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    rank = np.random.default_rng([int(seed), 104729]).permutation(n).astype(np.int64)
    column = rank % batch_size
    mine = np.flatnonzero(column // per == process_index)
    mine = mine[np.lexsort((rank[mine], column[mine]))]
    nb = n // batch_size if drop_last else -(-n // batch_size)
    column_ids = list(range(process_index * per, (process_index + 1) * per))
    return mine.astype(np.int64), column[mine], column_ids, nb


@dataclasses.dataclass
class DataBundle:
    train: BatchIterator
    val: Optional[BatchIterator]
    train_dataset: TokenizedDataset
    val_dataset: Optional[TokenizedDataset]
    report: InvalidReport
    summary: dict

    def summary_text(self) -> str:
        s = self.summary
        lines = [f"data: {s['kind']} | {self.report.summary()}"]
        lines.append(
            f"  train {s['train_records']} records (this host {s['train_records_host']}), "
            f"val {s['val_records']}; truncated at {s['cutoff_len']}: {s['train_truncated']} train, "
            f"{s['val_truncated']} val; tokenisation cache {'hit' if s['cache_hit'] else 'miss'}")
        lines.append(f"  batch shapes (rows, L): {s['shapes']}; steps/epoch {s['steps_per_epoch']}")
        if s["dropped_for_equal_shards"]:
            lines.append(f"  {s['dropped_for_equal_shards']} training records left out so every host has an equal shard")
        return "\n".join(lines)


def _jax_processes():
    try:
        import jax

        return jax.process_index(), jax.process_count()
    except Exception:  # pragma: no cover - jax is a core dependency
        return 0, 1


def build_data(
    cfg: Any,
    tokenizer,
    *,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> DataBundle:
    """Read, validate, split, shard, tokenise (cached) and wrap in iterators. See the module docstring."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_mapping(cfg)
    if cfg.kind not in TRAIN_KINDS:
        raise ValueError(f"data.kind must be one of {TRAIN_KINDS}, got {cfg.kind!r}")
    if not cfg.train_files:
        raise ValueError("data.train_files is empty; point it at your training data")
    if process_index is None or process_count is None:
        process_index, process_count = _jax_processes()
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {process_count} processes")
    if process_count > 1 and allgather is None:
        from jax.experimental import multihost_utils

        allgather = multihost_utils.process_allgather

    records, report = load_records(cfg.kind, cfg.train_files, skip_invalid=cfg.skip_invalid)
    if cfg.val_files:  # then val_fraction / val_count are not used
        val_records, val_report = load_records(cfg.kind, cfg.val_files, skip_invalid=cfg.skip_invalid)
        report.merge(val_report)
        train_records = records
        train_index = np.arange(len(records), dtype=np.int64)
        val_index = np.arange(len(val_records), dtype=np.int64)
    else:
        train_records, val_records, train_index, val_index = split_validation(
            records, cfg.val_fraction, cfg.val_count, cfg.seed)
    if not train_records:
        raise ValueError(f"no valid training records in {list(cfg.train_files)} ({report.summary()})")

    # The same key on every host: the iterator state saved on one host restores on all of them.
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([cfg.kind, cfg.cutoff_len, cfg.template, cfg.system, cfg.seed, process_count,
                         tokenizer_fingerprint(tokenizer)]).encode())
    for r in train_records:
        h.update(json.dumps({k: v for k, v in r.items() if k != "id"}, sort_keys=True, ensure_ascii=False).encode())
    state_key = h.hexdigest()

    local_bs = cfg.batch_size // process_count
    column_kw = {}
    if cfg.pack:
        t_idx = shard_indices(len(train_records), process_index, process_count, equal=True)
        dropped = len(train_records) - len(t_idx) * process_count
    else:
        t_idx, columns, column_ids, nb = column_shard(len(train_records), cfg.batch_size, process_index,
                                                      process_count, cfg.seed, cfg.drop_last)
        column_kw = dict(columns=columns, column_ids=column_ids, batches_per_epoch=nb)
        dropped = 0
    common = dict(tok=tokenizer, kind=cfg.kind, cutoff_len=cfg.cutoff_len, template=cfg.template,
                  default_system=cfg.system, cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)
    train_ds = TokenizedDataset.build([train_records[i] for i in t_idx], source_index=train_index[t_idx], **common)
    train_it = BatchIterator(train_ds, local_bs, seed=cfg.seed, shuffle=True, num_epochs=cfg.num_epochs,
                             drop_last=cfg.drop_last, buckets=cfg.buckets, bucket_step=cfg.bucket_step,
                             pack=cfg.pack, allgather=allgather, state_key=state_key, share_prompt=cfg.share_prompt,
                             **column_kw)
    val_ds = val_it = None
    if val_records:
        v_idx = shard_indices(len(val_records), process_index, process_count, equal=False)
        val_ds = TokenizedDataset.build([val_records[i] for i in v_idx], source_index=val_index[v_idx], **common)
        ebs = (cfg.eval_batch_size or cfg.batch_size) // process_count
        if ebs < 1:
            raise ValueError(f"eval_batch_size must be >= process_count ({process_count})")
        val_it = BatchIterator(val_ds, ebs, shuffle=False, num_epochs=1, drop_last=False,
                               buckets=cfg.buckets, bucket_step=cfg.bucket_step, pack=False,
                               allgather=allgather, share_prompt=cfg.share_prompt)
    summary = {
        "kind": cfg.kind,
        "train_records": len(train_records),
        "train_records_host": len(train_ds),
        "val_records": len(val_records),
        "invalid": report.to_dict(),
        "cutoff_len": cfg.cutoff_len,
        "train_truncated": train_ds.num_truncated(),
        "val_truncated": val_ds.num_truncated() if val_ds is not None else 0,
        "cache_hit": bool(train_ds.meta.get("cache_hit")),
        "shapes": train_it.shapes(),
        "steps_per_epoch": train_it.steps_per_epoch,
        "dropped_for_equal_shards": dropped,
        "process_index": process_index,
        "process_count": process_count,
    }
    return DataBundle(train_it, val_it, train_ds, val_ds, report, summary)


def fresh_val_iterator(bundle: DataBundle) -> Optional[BatchIterator]:
    """A new one-pass validation iterator (call it at every evaluation)."""
    if bundle.val is None:
        return None
    v = bundle.val
    return BatchIterator(v.dataset, v.batch_size, shuffle=False, num_epochs=1, drop_last=False,
                         buckets=list(v.buckets), allgather=v.allgather, share_prompt=v.share_prompt)
