"""Trainer correctness fixes (issue 18): SFT accumulation, LoRA dropout per micro-batch, epochs with
accumulation, reference cache key and atomic write, weight decay, logged grad_norm.

A tiny model (97-row vocabulary) goes through the trainer's real jitted steps; each test is quick.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_config
from iopo_jax.models.config import LoRAConfig, ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.objectives import ObjectiveConfig, get_objective
from iopo_jax.paths import save_npz as atomic_savez
from iopo_jax.trainer import (frozen_keys, make_optimizer, make_steps, optimizer_steps,
                              reference_cache_key, split_model, window_metrics)


def _model(lora=None, seed=0):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, lora=lora)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _rows(n, t, n_labels, seed):
    """n rows of length t whose last n_labels[i] tokens are labelled."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 97, (n, t)).astype(np.int32)
    labels = np.full((n, t), -100, np.int32)
    for i, nl in enumerate(n_labels):
        labels[i, t - nl:] = ids[i, t - nl:]
    return {"input_ids": ids, "labels": labels, "segment_ids": np.ones((n, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(), "valid": np.ones((n,), bool)}


def _dev(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


def _opt(**kw):
    o = get_config().optimizer
    for k, v in kw.items():
        o[k] = v
    return o


def test_sft_accumulation_equals_full_batch():
    """4 micro-batches with very different token counts: accumulated gradient and logged loss = full batch."""
    parts, trainable = split_model(_model(), lora=False)
    tx = make_optimizer(_opt(), 10, trainable)
    micro, _, _, _ = make_steps(parts, get_objective("sft"), ObjectiveConfig(), 1, 8, tx, seed=0, dropout=False)
    micro_batches = [_rows(2, 16, [15, 14], 1), _rows(2, 16, [1, 2], 2), _rows(2, 16, [9, 3], 3),
                     _rows(2, 16, [1, 1], 4)]
    full = {k: np.concatenate([b[k] for b in micro_batches]) for k in micro_batches[0]}

    def accumulate(batches):
        acc = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        ms = []
        for i, b in enumerate(batches):
            acc, m = micro(trainable, acc, _dev(b), jnp.int32(0), jnp.int32(i))
            ms.append(m)
        metrics, divisor = window_metrics(ms, True)
        return {k: np.asarray(v) / divisor for k, v in acc.items()}, metrics

    g_acc, m_acc = accumulate(micro_batches)
    g_full, m_full = accumulate([full])
    assert m_full["loss_tokens"] == m_acc["loss_tokens"] == 46
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
    num = np.sqrt(sum(np.sum((g_acc[k] - g_full[k]) ** 2) for k in g_full))
    den = np.sqrt(sum(np.sum(g_full[k] ** 2) for k in g_full))
    assert den > 0 and num / den < 1e-5, num / den


def test_lora_dropout_masks_differ_across_micro_batches():
    parts, trainable = split_model(_model(LoRAConfig(rank=4, alpha=8.0, dropout=0.5)), lora=True)
    trainable = {k: (jnp.full_like(v, 0.1) if k.endswith("lora_b") else v) for k, v in trainable.items()}
    tx = make_optimizer(_opt(), 10, trainable)
    micro, _, _, _ = make_steps(parts, get_objective("sft"), ObjectiveConfig(), 1, 8, tx, seed=0, dropout=True)
    b = _dev(_rows(2, 12, [6, 6], 0))

    def grads(step, i):
        acc = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        acc, _ = micro(trainable, acc, b, jnp.int32(step), jnp.int32(i))
        return np.concatenate([np.asarray(v).ravel() for v in acc.values()])

    g00 = grads(0, 0)
    np.testing.assert_array_equal(g00, grads(0, 0))  # reruns / resumes draw the same masks
    assert not np.allclose(g00, grads(0, 1))  # another micro-batch of the same step: other masks
    assert not np.allclose(g00, grads(1, 0))


def test_num_epochs_honoured_when_accumulation_does_not_divide():
    """15 micro-batches per epoch, accumulation 8, 3 epochs: 6 steps that use all 45 micro-batches."""
    from data_pipeline.batching import BatchIterator

    it = _FakeIter(steps_per_epoch=15, num_epochs=3)
    steps = optimizer_steps(it, 3, 8)
    assert steps == 6
    # the trainer's loop: up to grad_accum micro-batches per step until the iterator ends
    used, src = 0, iter(range(len(it)))
    for _ in range(steps):
        n = len([x for _, x in zip(range(8), src)])
        assert n > 0
        used += n
    assert used == 45
    assert optimizer_steps(_FakeIter(15, 3), 0, 8) == 2  # num_epochs unset: one epoch
    with pytest.raises(ValueError, match="no micro-batch"):
        optimizer_steps(_FakeIter(0, 3), 3, 8)
    assert BatchIterator  # the real iterator has the same len() / steps_per_epoch interface


class _FakeIter:
    def __init__(self, steps_per_epoch, num_epochs):
        self.steps_per_epoch, self.num_epochs, self.batch_size = steps_per_epoch, num_epochs, 4

    def __len__(self):
        return self.steps_per_epoch * self.num_epochs


def test_reference_cache_key_and_atomic_write(tmp_path, monkeypatch):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"a" * 100)
    cfg = get_config()
    key = reference_cache_key("data", str(d), cfg, 4)
    assert key == reference_cache_key("data", str(d), cfg, 4)
    cfg.model.param_dtype = "bfloat16"
    assert reference_cache_key("data", str(d), cfg, 4) != key
    cfg.model.param_dtype = "float32"
    assert reference_cache_key("data", str(d), cfg, 4) == key
    (d / "model.safetensors").write_bytes(b"b" * 101)  # an SFT model re-exported to the same path
    assert reference_cache_key("data", str(d), cfg, 4) != key

    path = str(tmp_path / "ref.npz")
    atomic_savez(path, a=np.arange(3))
    np.testing.assert_array_equal(np.load(path)["a"], np.arange(3))

    def killed(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_savez(path, a=np.arange(5))
    np.testing.assert_array_equal(np.load(path)["a"], np.arange(3))  # the old file is intact
    assert os.listdir(tmp_path) == sorted(os.listdir(tmp_path)) and len(os.listdir(tmp_path)) == 2  # no tmp left


def test_weight_decay_skips_biases_and_norm_scales():
    _, trainable = split_model(_model(), lora=False)
    tx = make_optimizer(_opt(weight_decay=0.5, lr=0.1, warmup_ratio=0.0, schedule="constant"), 10, trainable)
    state = tx.init(trainable)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zeros, state, trainable)
    kinds = set()
    for k, u in updates.items():
        u = np.asarray(u)
        if k.endswith((".bias", ".scale")):
            np.testing.assert_array_equal(u, 0, err_msg=k)
            kinds.add(k.rsplit(".", 1)[-1])
        else:  # decoupled decay: -lr * wd * w
            np.testing.assert_allclose(u, -0.05 * np.asarray(trainable[k]), rtol=1e-6, err_msg=k)
    assert kinds == {"bias", "scale"}


def test_grad_norm_excludes_frozen_parameters():
    parts, trainable = split_model(_model(), lora=False)
    opt = _opt(freeze_patterns=("embed",), max_grad_norm=1.0)
    frozen = frozen_keys(opt, trainable)
    assert frozen == {"embed.embedding"}
    tx = make_optimizer(opt, 10, trainable)
    _, apply, _, _ = make_steps(parts, get_objective("sft"), ObjectiveConfig(), 1, 8, tx, seed=0, dropout=False,
                                frozen=frozen)
    grads = {k: jnp.full_like(v, 1000.0 if k in frozen else 0.001) for k, v in trainable.items()}
    expect = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for k, g in grads.items() if k not in frozen)))
    _, _, _, info = apply(trainable, jax.jit(tx.init)(trainable), grads, jnp.float32(1.0))
    np.testing.assert_allclose(float(info["grad_norm"]), expect, rtol=1e-5)
