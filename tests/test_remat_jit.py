"""Activation checkpointing (model.remat) inside the real jitted train, reference and RL steps.

Every policy must give the losses and gradients of ``remat=none`` (up to float32 rounding of a
differently scheduled program) in the offline trainer's micro/eval/reference steps and in the RL
trainer's log-prob and gradient steps, with LoRA dropout on (its RNG state is threaded through).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iopo_jax.models.config import LoRAConfig, ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.objectives import ObjectiveConfig, get_objective
from iopo_jax.rl.loop import make_rl_steps
from iopo_jax.trainer import make_steps, split_model

from conftest import REPO

POLICIES = ["full", "dots", "dots_no_batch"]


def _model(remat, dropout):
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, remat=remat,
                      lora=LoRAConfig(rank=4, alpha=8.0, dropout=dropout))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # Non-zero LoRA B so the adapter (and its dropout) contributes to loss and gradients.
    for _, m in model.iter_modules():
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.05 * jnp.ones_like(m.lora_b[...])
    return model


def _batch(rows=4, t=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, (rows, t)).astype(np.int32)
    labels = ids.copy()
    labels[:, :5] = -100
    seg = np.ones((rows, t), np.int32)
    seg[1, -3:] = 0
    labels[1, -3:] = -100
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(pos), "valid": jnp.ones((rows,), bool)}


def _offline(remat, dropout):
    parts, trainable = split_model(_model(remat, dropout), lora=True)
    tx = optax.adamw(1e-3)
    micro, apply, evals, ref = make_steps(parts, get_objective("iopo"), ObjectiveConfig(beta=0.1), 4, 8, tx,
                                          seed=3, dropout=dropout > 0)
    batch = _batch()
    acc = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    grads, m = micro(trainable, acc, batch, jnp.int32(1))
    return ({k: np.asarray(v) for k, v in grads.items()}, float(m["loss"]), float(evals(trainable, batch)["loss"]),
            np.asarray(ref(trainable, batch)))


def _check_offline(dropout, policies):
    g0, l0, e0, r0 = _offline("none", dropout)
    assert any(np.abs(v).max() > 0 for v in g0.values())
    for pol in policies:
        g, l, e, r = _offline(pol, dropout)
        np.testing.assert_allclose(l, l0, rtol=1e-6, err_msg=pol)
        np.testing.assert_allclose(e, e0, rtol=1e-6, err_msg=pol)
        np.testing.assert_allclose(r, r0, rtol=1e-6, err_msg=pol)
        for k in g0:
            np.testing.assert_allclose(g[k], g0[k], rtol=1e-5, atol=1e-7, err_msg=f"{pol} {k}")


@pytest.mark.slow  # ~1 min on 2 cores
def test_offline_steps_remat_full_with_dropout():
    """Quick: remat=full with LoRA dropout inside the jitted micro, eval and reference steps."""
    _check_offline(0.3, ["full"])


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodropout", "dropout"])
def test_offline_steps_every_policy_equal_no_remat(dropout):
    _check_offline(dropout, POLICIES)


def _rl(remat):
    parts, trainable = split_model(_model(remat, 0.0), lora=True)
    logps, ref_logps, grad_step, _ = make_rl_steps(
        parts, optax.adamw(1e-3), temperature=1.0, chunk=8, max_label_tokens=None, eps_low=0.2, eps_high=0.28,
        kl_coef=0.01, aggregation="token_mean", seed=0)
    b = _batch()
    lp = logps(trainable, b)
    mask = b["labels"] != -100
    mb = dict(b, mask=mask, old_logp=lp - 0.01, advantages=jnp.linspace(-1.0, 1.0, 4)[:, None] * mask,
              ref_logp=ref_logps(trainable, b) + 0.02)
    acc = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    g, m = grad_step(trainable, acc, mb, jnp.float32(jnp.sum(mask)))
    return np.asarray(lp), np.asarray(mb["ref_logp"]), {k: np.asarray(v) for k, v in g.items()}, float(m["kl"])


@pytest.mark.slow
@pytest.mark.heavy
def test_rl_steps_every_policy_equal_no_remat():
    lp0, r0, g0, kl0 = _rl("none")
    assert any(np.abs(v).max() > 0 for v in g0.values())
    for pol in POLICIES:
        lp, r, g, kl = _rl(pol)
        np.testing.assert_allclose(lp, lp0, rtol=1e-6, atol=1e-6, err_msg=pol)
        np.testing.assert_allclose(r, r0, rtol=1e-6, atol=1e-6, err_msg=pol)
        np.testing.assert_allclose(kl, kl0, rtol=1e-5, atol=1e-7, err_msg=pol)
        for k in g0:
            np.testing.assert_allclose(g[k], g0[k], rtol=1e-5, atol=1e-7, err_msg=f"{pol} {k}")


def _cli_losses(workdir, remat):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/cpu_demo.py", f"--workdir={workdir}",
           "--noprogress", f"--config.model.remat={remat}", "--config.train.max_steps=2",
           # no validation split and an online reference: the check is the jitted steps, not the demo's
           # once-per-dataset reference pass or evaluations
           "--config.data.val_fraction=0.0", "--config.objective.reference=online",
           "--config.train.eval_every=0", "--config.checkpoint.every=100", "--config.train.plot=False",
           "--config.train.tensorboard=False", "--config.export.peft=False"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [l["loss"] for l in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if l["split"] == "train"]


@pytest.mark.slow
@pytest.mark.heavy
def test_cli_cpu_demo_remat_full_and_dots_equal_none(tmp_path):
    """The issue's command: the CPU demo with --config.model.remat=full / dots trains with the losses of none."""
    base = _cli_losses(tmp_path / "none", "none")
    assert len(base) == 2
    for pol in ("full", "dots"):
        np.testing.assert_allclose(_cli_losses(tmp_path / pol, pol), base, atol=1e-5, rtol=0, err_msg=pol)
