"""Shared-prompt packing of IOPO groups / DPO pairs: layout, and log-probs equal to the unpacked batches."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import BatchIterator, TokenizedDataset
from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.trainer import forward_logps

from test_data_tokenization import CharTok

VOCAB = 128


def _text(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))


def _records(kind, n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "iopo":
            out.append({"id": f"r{i}", "system": "", "x1": _text(rng, rng.randint(1, 40)),
                        "x2": _text(rng, rng.randint(1, 40)), "y1": _text(rng, rng.randint(1, 30)),
                        "y2": _text(rng, rng.randint(1, 30))})
        else:
            out.append({"id": f"p{i}", "system": "", "prompt": _text(rng, rng.randint(1, 40)),
                        "chosen": _text(rng, rng.randint(1, 30)), "rejected": _text(rng, rng.randint(1, 30))})
    return out


def _model():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, attention_impl="xla")
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "example_index"}


def test_shared_prompt_layout():
    ds = TokenizedDataset.build(_records("iopo", 3), CharTok(), "iopo", cutoff_len=None)
    b = next(iter(BatchIterator(ds, 3, shuffle=False, share_prompt=True, bucket_step=16)))
    assert b["input_ids"].shape[0] == 6 and "labels" not in b
    x1, x2, y1, y2 = ds.pieces(0)
    n = len(x1) + len(y1) + len(y2)
    np.testing.assert_array_equal(b["input_ids"][0, :n], np.concatenate([x1, y1, y2]))
    np.testing.assert_array_equal(b["input_ids"][1, :len(x2) + len(y2) + len(y1)], np.concatenate([x2, y2, y1]))
    seg, pre, pos = b["segment_ids"][0], b["prefix_ids"][0], b["positions"][0]
    assert (seg[:len(x1)] == 1).all() and (seg[len(x1):len(x1) + len(y1)] == 2).all()
    assert (seg[len(x1) + len(y1):n] == 3).all() and (seg[n:] == 0).all()
    assert (pre[:len(x1)] == 0).all() and (pre[len(x1):n] == 1).all()
    np.testing.assert_array_equal(pos[len(x1) + len(y1):n], len(x1) + np.arange(len(y2)))  # y2 continues x1
    # y2's first token is predicted from x1's last token
    j = len(y1)
    assert b["score_positions"][0, j] == len(x1) - 1 and b["score_targets"][0, j] == y2[0]
    assert b["score_sequence"][0, j] == 1 and b["score_sequence"][0, j - 1] == 0
    assert (b["score_targets"][0, len(y1) + len(y2):] == -100).all()


@pytest.mark.parametrize("kind", ["iopo", "dpo"])
def test_shared_prompt_logprobs_equal_unpacked(kind):
    ds = TokenizedDataset.build(_records(kind, 6, seed=1), CharTok(), kind, cutoff_len=None)
    plain = next(iter(BatchIterator(ds, 3, shuffle=False, bucket_step=16)))
    shared = next(iter(BatchIterator(ds, 3, shuffle=False, share_prompt=True, bucket_step=16)))
    k = ds.num_sequences
    assert shared["input_ids"].shape[0] * 2 == plain["input_ids"].shape[0] == 3 * k
    assert shared["segment_ids"].astype(bool).sum() < plain["segment_ids"].astype(bool).sum()
    model = _model()
    a = jax.jit(lambda b: forward_logps(model, b, chunk=16))(_jnp(plain))
    b = jax.jit(lambda b: forward_logps(model, b, chunk=16))(_jnp(shared))
    np.testing.assert_array_equal(np.asarray(a.token_count), np.asarray(b.token_count))
    assert np.asarray(a.token_count).min() > 0
    np.testing.assert_allclose(np.asarray(b.logp_sum), np.asarray(a.logp_sum), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.logits_mean), np.asarray(a.logits_mean), rtol=1e-5, atol=1e-5)
    # the valid rows line up with groups as the trainer reads them
    assert np.asarray(shared["valid"]).reshape(3, -1)[:, 0].all()


@pytest.mark.slow
def test_shared_prompt_gradients_equal_unpacked():
    ds = TokenizedDataset.build(_records("iopo", 2, seed=2), CharTok(), "iopo", cutoff_len=None)
    plain = _jnp(next(iter(BatchIterator(ds, 2, shuffle=False, bucket_step=16))))
    shared = _jnp(next(iter(BatchIterator(ds, 2, shuffle=False, share_prompt=True, bucket_step=16))))
    graph, params, rest = nnx.split(_model(), nnx.Param, ...)
    w = jnp.linspace(-1.0, 1.0, 8)

    def loss(p, batch):
        return jnp.sum(forward_logps(nnx.merge(graph, p, rest), batch, chunk=16).logp_sum * w)

    ga = jax.jit(jax.grad(loss))(params, plain)
    gb = jax.jit(jax.grad(loss))(params, shared)
    for x, y in zip(jax.tree_util.tree_leaves(gb), jax.tree_util.tree_leaves(ga)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_shared_prompt_refuses_sft():
    ds = TokenizedDataset.build([{"id": "s", "system": "", "turns": [["hi", "yo"]]}], CharTok(), "sft", cutoff_len=None)
    with pytest.raises(ValueError, match="share_prompt"):
        BatchIterator(ds, 1, share_prompt=True)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["iopo", "dpo"])
def test_trainer_with_shared_prompts_has_the_same_losses(kind, tiny_model_dir, tmp_path):
    """data.share_prompt through the Trainer, IOPO groups and DPO pairs: the same losses and log-probs as the
    unpacked rows (the reference precomputed in the shared run, online in the plain one). Heavy: ~3-4 min per
    kind on 2 loaded cores (~90 s of CPU time: two Trainer runs, each compiling its steps for the tiny model's
    151,936-row vocabulary); the log-prob and gradient equality of both layouts are default / slow tests above."""
    import json

    from conftest import DEMO_DIR
    from iopo_jax.trainer import Trainer
    from test_trainer import small_config

    data = tmp_path / f"{kind}.json"
    data.write_text(json.dumps(json.load(open(DEMO_DIR / f"{kind}_train.json"))[:4], ensure_ascii=False))
    col = "chosen_v1" if kind == "iopo" else "chosen"

    def losses(name, **kw):
        cfg = small_config(tiny_model_dir, str(data), data__kind=kind, objective__name=kind, train__max_steps=2,
                           optimizer__grad_accum=1, data__val_count=0, data__cutoff_len=128, checkpoint__every=100,
                           **kw)
        Trainer(cfg, str(tmp_path / name), devices=jax.devices()[:1], progress=False).run()
        lines = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
        train = [l for l in lines if l["split"] == "train"]
        return [l["loss"] for l in train], [l[f"logps/{col}"] for l in train]

    plain = losses("plain")
    shared = losses("shared", data__share_prompt=True, objective__reference="precompute")
    assert len(plain[0]) == 2 and np.isfinite(plain[0]).all()
    assert plain[0][0] != plain[0][1]  # the update moved the loss: the second step compares trained policies
    np.testing.assert_allclose(shared[0], plain[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared[1], plain[1], atol=1e-4, rtol=1e-6)
