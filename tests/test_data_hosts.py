"""Each host tokenises only its share of the training data, and the global batch of every step does not
depend on the number of hosts (simulated in-process: one thread per host, a barrier-based allgather)."""
import json
import os

import numpy as np
import pytest

import procs

from data_pipeline import DEMO_DATA_DIR, DataConfig, build_data, column_shard


def _hosts(cfg, tokenizer, P):
    """build_data on P simulated hosts; returns (bundles, batches per host)."""
    def host(p, ag):
        bundle = build_data(cfg, tokenizer, process_index=p, process_count=P, allgather=ag if P > 1 else None)
        return bundle, list(bundle.train)

    out = procs.simulated_hosts(P, host)
    return [o[0] for o in out], [o[1] for o in out]


def _global(batches):
    """The global batches: every host's batch of a step concatenated in process order."""
    return [{k: np.concatenate([h[s][k] for h in batches]) for k in batches[0][s]} for s in range(len(batches[0]))]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    groups = json.load(open(os.path.join(DEMO_DATA_DIR, "iopo_train.json")))[:75]
    p = tmp_path_factory.mktemp("hosts_data") / "iopo75.json"
    p.write_text(json.dumps(groups, ensure_ascii=False))
    return str(p)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_hosts_tokenize_disjoint_shares_and_global_batches_do_not_depend_on_host_count(
        qwen_tokenizer, data_file, share_prompt):
    # 75 groups, 5 held out: 70 training groups, 8 per global batch -> 8 steps per epoch, 6 groups left out
    cfg = DataConfig(kind="iopo", train_files=[data_file], val_count=5, val_fraction=0.0, cutoff_len=256, batch_size=8,
                     num_epochs=2, bucket_step=64, share_prompt=share_prompt)
    (one,), (ref,) = _hosts(cfg, qwen_tokenizer, 1)
    assert len(ref) == 2 * (70 // 8)
    everything = set(one.train_dataset.source_index.tolist())
    assert len(everything) == 70
    for P in (2, 4):
        bundles, batches = _hosts(cfg, qwen_tokenizer, P)
        shares = [set(b.train_dataset.source_index.tolist()) for b in bundles]  # what each host tokenised
        assert sum(len(s) for s in shares) == 70 and set().union(*shares) == everything
        assert all(len(s) >= 70 // P - 2 for s in shares)  # no host tokenises (almost) everything
        assert [b.summary["train_records_host"] for b in bundles] == [len(s) for s in shares]
        glob = _global(batches)
        assert len(glob) == len(ref)
        for step, (a, b) in enumerate(zip(glob, ref)):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"P={P} step {step} {k}")
    # the order is shuffled: the epochs differ and each leaves out another 6 groups
    per_epoch = [np.concatenate([b["example_index"] for b in ref[e * 8:(e + 1) * 8]]) for e in range(2)]
    assert all(len(set(x.tolist())) == 64 for x in per_epoch)
    assert set(per_epoch[0].tolist()) != set(per_epoch[1].tolist())
    assert per_epoch[0][:8].tolist() != per_epoch[1][:8].tolist()


def test_column_shard_sizes_and_errors():
    for n, B, P in [(70, 8, 2), (3, 8, 4), (64, 8, 8), (1000, 16, 4)]:
        parts = [column_shard(n, B, p, P, seed=3) for p in range(P)]
        idx = np.concatenate([x[0] for x in parts])
        assert sorted(idx.tolist()) == list(range(n))
        assert all(x[3] == n // B for x in parts)
        assert all(set(x[1].tolist()) <= set(x[2]) and len(x[2]) == B // P for x in parts)
    assert column_shard(70, 8, 0, 1, drop_last=False)[3] == 9
    with pytest.raises(ValueError, match="not divisible"):
        column_shard(10, 6, 0, 4)
    with pytest.raises(ValueError, match="out of range"):
        column_shard(10, 8, 2, 2)
