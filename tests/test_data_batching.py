"""Static-shape batches, length buckets, packing, resumable iteration, host sharding and the cache."""
import itertools
import json
import os
import random

import numpy as np
import pytest

from data_pipeline import (DEMO_DATA_DIR, BatchIterator, DataConfig, TokenizedDataset, build_data, load_records,
                           make_buckets, split_validation, tokenize_record)
from data_pipeline.batching import pack_rows
from data_pipeline.pipeline import fresh_val_iterator, shard_indices

import procs
from test_data_tokenization import CharTok


def _iopo_records(n, seed=0, max_len=300):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        top = rng.choice([max_len // 8, max_len // 3, max_len])  # mixed lengths: mostly short groups
        a, b = rng.randint(1, top), rng.randint(1, top)
        c, d = rng.randint(1, top // 2), rng.randint(1, top // 2)
        out.append({"id": f"r{i}", "x1": "a" * a, "x2": "b" * b, "y1": "c" * c, "y2": "d" * d, "system": ""})
    return out


def _sft_records(n, seed=0, max_len=200):
    rng = random.Random(seed)
    return [{"id": f"s{i}", "system": "", "turns": [["u" * rng.randint(1, max_len), "a" * rng.randint(1, max_len)]]}
            for i in range(n)]


@pytest.fixture(scope="module")
def iopo_ds():
    return TokenizedDataset.build(_iopo_records(53), CharTok(), "iopo", cutoff_len=384)


def _collect(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- layout -----------------------------------------------------------------------------------------
def test_batch_layout_matches_tokenize_record(iopo_ds):
    tok = CharTok()
    recs = _iopo_records(53)
    it = BatchIterator(iopo_ds, batch_size=4, seed=3)
    batch = next(it)
    assert set(batch) == {"input_ids", "labels", "segment_ids", "attention_mask", "positions", "valid", "example_index"}
    R, L = batch["input_ids"].shape
    assert R == 16 and L % 128 == 0
    for k in ("input_ids", "labels", "segment_ids", "attention_mask", "positions"):
        assert batch[k].dtype == np.int32 and batch[k].shape == (R, L)
    for g, ex in enumerate(batch["example_index"]):
        want = tokenize_record(tok, "iopo", recs[ex], 384)
        for k, name in enumerate(("chosen_v1", "rejected_v1", "chosen_v2", "rejected_v2")):
            row = 4 * g + k
            ids, labels = want[name]["input_ids"], want[name]["labels"]
            n = len(ids)
            assert batch["input_ids"][row, :n].tolist() == ids
            assert batch["labels"][row, :n].tolist() == labels
            assert (batch["input_ids"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
            assert batch["segment_ids"][row].tolist() == [1] * n + [0] * (L - n)
            assert batch["positions"][row].tolist() == list(range(n)) + [0] * (L - n)
    # the bucket is the smallest that holds the longest sequence of the batch
    longest = int(batch["attention_mask"].sum(1).max())
    assert L - 128 < longest <= L
    assert batch["valid"].all()


def test_epoch_covers_every_record_once_and_shapes_are_bounded(iopo_ds):
    it = BatchIterator(iopo_ds, batch_size=5, seed=1, num_epochs=2, drop_last=False)
    batches = _collect(it)
    assert len(batches) == 2 * 11 == len(it)
    for e in range(2):
        idx = np.concatenate([b["example_index"] for b in batches[e * 11:(e + 1) * 11]])
        assert sorted(idx[idx >= 0].tolist()) == list(range(53))
    last = batches[10]
    assert (last["example_index"] == -1).sum() == 2 and (~last["valid"]).sum() == 8
    assert (last["segment_ids"][~last["valid"]] == 0).all()
    shapes = {b["input_ids"].shape for b in batches}
    assert len(shapes) > 1  # mixed lengths really use several buckets
    assert len(shapes) <= len(it.buckets) == 3 and shapes <= set(it.shapes())
    # a new epoch reshuffles; the same seed repeats
    first = [b["example_index"].tolist() for b in batches[:11]]
    second = [b["example_index"].tolist() for b in batches[11:]]
    assert first != second
    again = [b["example_index"].tolist() for b in _collect(BatchIterator(iopo_ds, 5, seed=1, drop_last=False))]
    assert again == first
    other = [b["example_index"].tolist() for b in _collect(BatchIterator(iopo_ds, 5, seed=2, drop_last=False))]
    assert other != first


def test_explicit_buckets_and_too_long_sequences(iopo_ds):
    it = BatchIterator(iopo_ds, 4, buckets=[512, 200], num_epochs=1)
    assert it.buckets.tolist() == [200, 512]
    assert {b["input_ids"].shape[1] for b in it} <= {200, 512}
    with pytest.raises(ValueError, match="longer than the largest length bucket"):
        BatchIterator(iopo_ds, 4, buckets=[128])
    assert make_buckets(300, 128).tolist() == [128, 256, 384]


# ---- resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [0, 3, 10, 11, 17])
def test_resume_yields_the_same_batches(iopo_ds, stop):
    ref = _collect(BatchIterator(iopo_ds, batch_size=5, seed=7, num_epochs=3))
    it = BatchIterator(iopo_ds, batch_size=5, seed=7, num_epochs=3)
    head = _collect(it, stop) if stop else []
    state = json.loads(json.dumps(it.get_state()))
    it2 = BatchIterator(iopo_ds, batch_size=5, seed=7, num_epochs=3)
    it2.set_state(state)
    rest = _collect(it2)
    assert len(head) + len(rest) == len(ref) == 30
    for a, b in zip(head + rest, ref):
        _same(a, b)


def test_set_state_rejects_other_settings(iopo_ds):
    state = BatchIterator(iopo_ds, 5, seed=7).get_state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(iopo_ds, 5, seed=8).set_state(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(iopo_ds, 4, seed=7).set_state(state)
    other = iopo_ds.select(range(10))
    with pytest.raises(ValueError, match="num_records"):
        BatchIterator(other, 5, seed=7).set_state(state)


# ---- packing ----------------------------------------------------------------------------------------
def test_packed_sft_rows():
    recs = _sft_records(40)
    ds = TokenizedDataset.build(recs, CharTok(), "sft", cutoff_len=256)
    it = BatchIterator(ds, batch_size=3, pack=True, seed=0, num_epochs=1, drop_last=False)
    batches = _collect(it)
    seen = []
    for b in batches:
        assert b["input_ids"].shape == (3, 256) and "example_index" not in b
        for r in range(3):
            seg = b["segment_ids"][r]
            n_seg = int(seg.max())
            assert b["valid"][r] == (n_seg > 0)
            assert (b["attention_mask"][r] == (seg > 0)).all()
            used = int((seg > 0).sum())
            assert (seg[used:] == 0).all() and (np.diff(seg[:used]) >= 0).all()  # contiguous, right padded
            for s in range(1, n_seg + 1):
                cols = np.nonzero(seg == s)[0]
                assert b["positions"][r, cols].tolist() == list(range(len(cols)))
                ids = b["input_ids"][r, cols].tolist()
                match = [i for i in range(len(recs)) if ds.sequence(i, 0)[0].tolist() == ids]
                assert match and b["labels"][r, cols].tolist() == ds.sequence(match[0], 0)[1].tolist()
                seen.append(match[0])
    assert sorted(seen) == list(range(40))  # every conversation exactly once
    fill = sum(int((b["segment_ids"] > 0).sum()) for b in batches) / sum(b["segment_ids"].size for b in batches)
    assert fill > 0.6
    with pytest.raises(ValueError, match="only for SFT"):
        BatchIterator(TokenizedDataset.build(_iopo_records(3), CharTok(), "iopo", 384), 1, pack=True)


def test_pack_rows_first_fit():
    assert pack_rows(np.array([6, 5, 4, 3, 2]), np.arange(5), 10, window=8) == [[0, 2], [1, 3, 4]]
    assert pack_rows(np.array([6, 5, 4]), np.arange(3), 10, window=1) == [[0], [1, 2]]


# ---- several hosts ---------------------------------------------------------------------------------------
def _run_hosts(build, P=2):
    """Run one iterator per simulated host in threads with a barrier-based allgather."""
    return procs.simulated_hosts(P, lambda p, ag: _collect(build(p, ag)), timeout=60)


def test_hosts_agree_on_shapes_and_split_the_data():
    recs = _iopo_records(45, seed=5)
    tok = CharTok()

    def build(p, ag):
        idx = shard_indices(len(recs), p, 2, equal=False)
        ds = TokenizedDataset.build([recs[i] for i in idx], tok, "iopo", 384, source_index=idx)
        return BatchIterator(ds, 4, shuffle=True, seed=0, num_epochs=1, drop_last=False, allgather=ag)

    h0, h1 = _run_hosts(build)
    assert len(h0) == len(h1) == 6  # 23 and 22 records, 4 per host step
    for a, b in zip(h0, h1):
        assert a["input_ids"].shape == b["input_ids"].shape
    idx = np.concatenate([b["example_index"] for b in h0 + h1])
    assert sorted(idx[idx >= 0].tolist()) == list(range(45))
    assert shard_indices(45, 1, 2, equal=True).tolist() == list(range(1, 45, 2))[:22]


def test_build_data_on_two_simulated_hosts(qwen_tokenizer, tmp_path):
    cfg = DataConfig(kind="iopo", train_files=[os.path.join(DEMO_DATA_DIR, "iopo_train.json")], val_count=24,
                     val_fraction=0.0, cutoff_len=256, batch_size=8, num_epochs=1, cache_dir=str(tmp_path))
    bundles = [None, None]

    def build(p, ag):
        bundles[p] = build_data(cfg, qwen_tokenizer, process_index=p, process_count=2, allgather=ag)
        return bundles[p].train

    h0, h1 = _run_hosts(build)
    assert len(h0) == len(h1) == 216 // 8
    assert all(a["input_ids"].shape == b["input_ids"].shape == (16, a["input_ids"].shape[1]) for a, b in zip(h0, h1))
    idx0 = {int(i) for b in h0 for i in b["example_index"]}
    idx1 = {int(i) for b in h1 for i in b["example_index"]}
    assert not idx0 & idx1 and len(idx0 | idx1) == 216
    assert bundles[0].summary["train_records_host"] == 108
    # a state saved on host 0 is valid on host 1 (same key on every host)
    assert bundles[0].train.get_state() == bundles[1].train.get_state()
    state = dict(bundles[0].train.get_state(), epoch=0, step=5)

    def resume(p, ag):
        it = bundles[p].train
        it.allgather = ag
        it.set_state(state)
        return itertools.islice(it, 3)

    r0, r1 = _run_hosts(resume)
    for a, b in zip(r0 + r1, h0[5:8] + h1[5:8]):
        _same(a, b)


# ---- cache and one-call setup --------------------------------------------------------------------------
def test_cache_hit_and_fingerprint(tmp_path):
    recs = _iopo_records(20)
    tok = CharTok()
    a = TokenizedDataset.build(recs, tok, "iopo", 256, cache_dir=str(tmp_path))
    b = TokenizedDataset.build(recs, tok, "iopo", 256, cache_dir=str(tmp_path))
    assert a.meta["cache_hit"] is False and b.meta["cache_hit"] is True
    assert a.fingerprint == b.fingerprint
    for i in range(20):
        assert a.example(i) == b.example(i)
    assert TokenizedDataset.build(recs, tok, "iopo", 200, cache_dir=str(tmp_path)).fingerprint != a.fingerprint
    assert TokenizedDataset.build(recs, tok, "iopo", 256, template="llama3").fingerprint != a.fingerprint
    recs2 = [dict(r) for r in recs]
    recs2[5]["y1"] += "!"
    assert TokenizedDataset.build(recs2, tok, "iopo", 256).fingerprint != a.fingerprint
    assert len(os.listdir(tmp_path)) == 2  # two cache entries, no temporary leftovers


def test_num_proc_2_matches_single_process(qwen_tokenizer):
    recs, _ = load_records("iopo", os.path.join(DEMO_DATA_DIR, "iopo_train.json"))
    recs = (recs * 5)[:1100]  # more than one 1000-text chunk per process
    a = TokenizedDataset.build(recs, qwen_tokenizer, "iopo", 96, num_proc=1)
    b = TokenizedDataset.build(recs, qwen_tokenizer, "iopo", 96, num_proc=2)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(a.seq_lens, b.seq_lens)
    assert a.fingerprint == b.fingerprint and a.num_truncated() > 0


def test_split_validation():
    recs = list(range(100))
    tr, va, ti, vi = split_validation(recs, fraction=0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90 and sorted(tr + va) == recs and va == sorted(va)
    assert split_validation(recs, fraction=0.1, seed=0)[1] == va
    assert split_validation(recs, fraction=0.1, seed=1)[1] != va
    assert len(split_validation(recs, count=7)[1]) == 7
    assert len(split_validation(list(range(3)), fraction=0.1)[1]) == 1
    with pytest.raises(ValueError):
        split_validation(recs, count=100)


def test_build_data_demo_iopo(qwen_tokenizer, tmp_path):
    cfg = {"kind": "iopo", "train_files": os.path.join(DEMO_DATA_DIR, "iopo_train.json"), "val_fraction": 0.1,
           "cutoff_len": 256, "batch_size": 4, "num_epochs": 1, "cache_dir": str(tmp_path)}
    data = build_data(cfg, qwen_tokenizer, process_index=0, process_count=1)
    s = data.summary
    assert s["train_records"] == 216 and s["val_records"] == 24 and s["cache_hit"] is False
    assert s["shapes"] == [(16, 128), (16, 256)] and s["steps_per_epoch"] == 54
    assert "240 records read, none invalid" in data.summary_text()
    batch = next(data.train)
    assert batch["input_ids"].shape[0] == 16 and (batch["input_ids"][:, 0] == 151644).all()
    val = _collect(fresh_val_iterator(data))
    assert len(val) == 6 and sum(int(b["valid"].sum()) for b in val) == 24 * 4
    assert build_data(cfg, qwen_tokenizer, process_index=0, process_count=1).summary["cache_hit"] is True
    with pytest.raises(ValueError, match=r"config\.data does not match DataConfig: unknown fields: lr"):
        build_data(dict(cfg, lr=1.0), qwen_tokenizer)


def test_build_data_sft_packed_and_skip_invalid(qwen_tokenizer, tmp_path):
    src = os.path.join(DEMO_DATA_DIR, "sft_train.jsonl")
    lines = open(src, encoding="utf-8").read().splitlines()[:60]
    lines.insert(3, lines[3][:50])  # a truncated line
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(kind="sft", train_files=[str(path)], cutoff_len=256, batch_size=2, pack=True,
                     skip_invalid=True, num_epochs=1, val_fraction=0.0)
    data = build_data(cfg, qwen_tokenizer, process_index=0, process_count=1)
    assert data.report.counts == {"json_decode": 1} and data.summary["train_records"] == 60
    batches = _collect(data.train)
    assert {b["input_ids"].shape for b in batches} == {(2, 256)}
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) <= 60
    assert max(int(b["segment_ids"].max()) for b in batches) > 1
    cfg.skip_invalid = False
    with pytest.raises(Exception, match=r"sft.jsonl:4"):
        build_data(cfg, qwen_tokenizer, process_index=0, process_count=1)
