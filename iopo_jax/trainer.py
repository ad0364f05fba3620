"""Offline preference / SFT training: state, jitted steps, evaluation, the loop.

The pieces are pure functions over explicit arrays:

- ``trainable`` (dict path -> array): LoRA factors (``finetune=lora``) or all weights (``full``);
- ``frozen`` (nnx states): the base weights (LoRA) and RNG streams, never updated, never donated;
- one jitted ``micro_step`` per micro-batch adds gradients into a donated accumulator;
- one jitted ``apply_step`` clips, runs AdamW (optax, masked by ``freeze_patterns``) and
  refuses non-finite updates (the state is left untouched and the loop stops).

The reference policy is the base model with LoRA switched off (LoRA B set to zero, which is
exactly the base) or, for full fine-tuning, the weights as loaded. Its log-probs are computed
outside the gradient every step (``objective.reference=online``) or once per dataset and cached
(``precompute``).

Example::

    from configs.cpu_demo import get_config
    result = Trainer(get_config(), workdir="/tmp/run").run()
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iopo_jax import paths
from iopo_jax.checkpoint import Checkpointer
from iopo_jax.logprobs import scored_sequence_logprobs, sequence_logprobs
from iopo_jax.models.config import LORA_TARGETS_ALL, LoRAConfig
from iopo_jax.models.weights import load_model
from iopo_jax.objectives import ObjectiveConfig, get_objective
from iopo_jax.objectives.losses import CHOSEN_COLUMNS
from iopo_jax.sharding import batch_sharding, make_mesh, path_str, use_mesh

log = logging.getLogger("iopo_jax.train")

K_OF_KIND = {"iopo": 4, "dpo": 2, "sft": 1}


class TrainingDiverged(FloatingPointError):
    """Loss or gradients became NaN/Inf."""


# ----------------------------------------------------------------------------- config checks
def _csv(s) -> list[str]:
    if isinstance(s, (list, tuple)):
        return [str(x) for x in s if str(x)]
    return [x.strip() for x in str(s or "").split(",") if x.strip()]


def check_config(cfg) -> None:
    """Fail early, naming the field, on values the run cannot use."""
    def bad(field, value, why):
        raise ValueError(f"config.{field}={value!r}: {why}")

    if cfg.model.finetune not in ("lora", "full"):
        bad("model.finetune", cfg.model.finetune, "must be 'lora' or 'full'")
    if not cfg.model.path:
        bad("model.path", cfg.model.path, "set it to a HF checkpoint directory or hub id")
    if cfg.data.kind not in K_OF_KIND:
        bad("data.kind", cfg.data.kind, f"must be one of {sorted(K_OF_KIND)}")
    obj = get_objective(cfg.objective.name)  # raises with the valid names
    k = K_OF_KIND[cfg.data.kind]
    if k not in obj.group_sizes:
        bad("objective.name", cfg.objective.name,
            f"needs groups of {obj.group_sizes} sequences but data.kind={cfg.data.kind!r} gives {k}")
    if cfg.data.get("share_prompt", False) and k == 1:
        bad("data.share_prompt", True, "shares a prompt between the answers of IOPO groups or DPO pairs, not SFT")
    if cfg.objective.reference not in ("online", "precompute"):
        bad("objective.reference", cfg.objective.reference, "must be 'online' or 'precompute'")
    if cfg.optimizer.schedule not in ("cosine", "linear", "constant"):
        bad("optimizer.schedule", cfg.optimizer.schedule, "must be cosine, linear or constant")
    if not 0 <= cfg.optimizer.warmup_ratio < 1:
        bad("optimizer.warmup_ratio", cfg.optimizer.warmup_ratio, "must be in [0, 1)")
    if cfg.optimizer.grad_accum < 1:
        bad("optimizer.grad_accum", cfg.optimizer.grad_accum, "must be >= 1")
    if not cfg.optimizer.lr > 0:
        bad("optimizer.lr", cfg.optimizer.lr, "must be > 0")
    targets = _csv(cfg.model.lora_targets)
    if targets != ["all"] and any(t not in LORA_TARGETS_ALL for t in targets):
        bad("model.lora_targets", cfg.model.lora_targets, f"names must be in {LORA_TARGETS_ALL} (or 'all')")
    for p in _csv(cfg.optimizer.freeze_patterns):
        try:
            re.compile(p)
        except re.error as e:
            bad("optimizer.freeze_patterns", p, f"not a valid regex ({e})")
    ObjectiveConfig.from_mapping(objective_hparams(cfg))


def objective_hparams(cfg) -> dict:
    o = cfg.objective
    return dict(beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing, pref_ftx=o.pref_ftx,
                simpo_gamma=o.simpo_gamma, orpo_lambda=o.orpo_lambda, sft_reduction=o.sft_reduction)


def lora_config(cfg) -> LoRAConfig | None:
    if cfg.model.finetune != "lora":
        return None
    targets = _csv(cfg.model.lora_targets)
    targets = LORA_TARGETS_ALL if targets == ["all"] else tuple(targets)
    return LoRAConfig(rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout,
                      targets=targets)


def data_config(cfg, workdir: str):
    from data_pipeline import DataConfig

    d = cfg.data
    buckets = [int(x) for x in _csv(d.buckets)] or None
    return DataConfig(
        kind=d.kind, train_files=_csv(d.train_files), val_files=_csv(d.val_files),
        val_fraction=0.0 if d.val_files else d.val_fraction, val_count=0 if d.val_files else d.val_count,
        skip_invalid=d.skip_invalid, template=d.template, system=d.system, cutoff_len=d.cutoff_len,
        batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, seed=d.seed, num_epochs=d.num_epochs,
        buckets=buckets, bucket_step=d.bucket_step, pack=d.pack, share_prompt=d.get("share_prompt", False),
        cache_dir=d.cache_dir or os.path.join(workdir, "data_cache"), num_proc=d.num_proc)


# ----------------------------------------------------------------------------- optimizer
def make_schedule(opt, total_steps: int):
    warmup = int(math.ceil(opt.warmup_ratio * total_steps))
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.lr)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, 0.0, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(opt.lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def frozen_keys(opt, trainable: dict) -> frozenset:
    """Paths of the trainable tree matching ``optimizer.freeze_patterns`` (never updated, not clipped)."""
    patterns = [re.compile(p) for p in _csv(opt.freeze_patterns)]
    return frozenset(k for k in trainable if any(p.search(k) for p in patterns))


def decays(key: str) -> bool:
    """Weight decay applies to weight matrices, embeddings and LoRA factors, not to biases and norm scales
    (the Hugging Face Trainer's rule)."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf not in ("bias", "scale")


def _decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_str(path)), params)


def make_optimizer(opt, total_steps: int, trainable: dict) -> optax.GradientTransformation:
    """AdamW (+ clipping) on the trainable tree; paths matching ``freeze_patterns`` get zero updates;
    biases and norm scales are not decayed."""
    chain = []
    if opt.max_grad_norm and opt.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.max_grad_norm))
    chain.append(optax.adamw(make_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=_decay_mask))
    tx = optax.chain(*chain)
    frozen = frozen_keys(opt, trainable)
    labels = {k: ("frozen" if k in frozen else "train") for k in trainable}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def resolve_model_dir(cfg) -> str:
    """``cfg.model.path``; creates the tiny random Qwen2 there first when asked (demo configs)."""
    m = cfg.model
    if not os.path.isdir(m.path) and m.make_tiny_if_missing:
        from iopo_jax.tools.make_tiny_model import make_tiny_model

        if jax.process_index() == 0:
            log.info("creating a tiny random Qwen2 model at %s", m.path)
            make_tiny_model(m.path, hidden_size=m.tiny_hidden_size, num_layers=m.tiny_num_layers,
                            intermediate_size=2 * m.tiny_hidden_size)
    return m.path


def checkpoint_identity(model_dir: str) -> str:
    """Identity of a checkpoint directory: name, size and modification time (ns) of each file in it, so
    re-exporting different weights to the same path gives a different identity. A hub id (no such
    directory) is its own identity."""
    if not os.path.isdir(model_dir):
        return model_dir
    entries = []
    for name in sorted(os.listdir(model_dir)):
        full = os.path.join(model_dir, name)
        if os.path.isfile(full):
            st = os.stat(full)
            entries.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def reference_cache_key(data_fingerprint: str, model_dir: str, cfg, k: int) -> str:
    """Key of a precomputed reference log-prob table: the data, the checkpoint (path and identity), the
    parameter and compute dtypes and the group size."""
    parts = [data_fingerprint, os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir,
             checkpoint_identity(model_dir), cfg.model.param_dtype, cfg.model.dtype, str(k)]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def optimizer_steps(train_it, num_epochs, grad_accum: int) -> int:
    """Optimizer steps that use every micro-batch of ``num_epochs`` epochs: ceil(micro-batches / grad_accum)
    (the last step accumulates the remainder). ``num_epochs`` None/0 counts one epoch."""
    micro = len(train_it) if num_epochs else train_it.steps_per_epoch
    if micro < 1:
        raise ValueError(f"the training set gives no micro-batch (data.batch_size={train_it.batch_size} rows "
                         "each); lower data.batch_size or add data")
    return -(-micro // grad_accum)


# ----------------------------------------------------------------------------- model plumbing
@dataclasses.dataclass
class ModelParts:
    """The model cut into what is trained and what is not.

    Compiled steps never close over arrays: they take :meth:`state` (the frozen weights and, for full
    fine-tuning, the reference weights) as an argument, so nothing is baked into a program as a
    constant and arrays that span several hosts can be used (``jax.distributed``).
    """

    graphdef: Any
    keys: list  # paths of the trainable leaves, in treedef order
    treedef: Any  # treedef of the trainable nnx.State
    frozen: tuple  # nnx states never updated (base weights, RNG streams)
    ref_trainable: dict | None  # full fine-tuning: the initial weights (the reference policy)
    lora: bool

    def state(self) -> dict:
        """The arrays every compiled step takes besides the trainable leaves (never donated)."""
        return {"frozen": self.frozen, "ref": self.ref_trainable}

    def merge(self, trainable: dict, dropout_key=None, state: dict | None = None):
        """The model with these trainable leaves; ``dropout_key`` reseeds every RNG stream (LoRA dropout).

        Inside a compiled function pass ``state`` (the argument holding :meth:`state`)."""
        frozen = (self.state() if state is None else state)["frozen"]
        tree = jax.tree_util.tree_unflatten(self.treedef, [trainable[k] for k in self.keys])
        if dropout_key is not None:
            frozen = tuple(_reseed(f, dropout_key) for f in frozen)
        return nnx.merge(self.graphdef, tree, *frozen)


class BoundStep:
    """A jitted step ``fn(state, *args)`` called as ``step(*args)``: the model state (``get_state()``) is
    passed as an argument at every call, never closed over. ``fn`` is the jitted function itself (for
    ``fn.lower(*abstract_args)``)."""

    def __init__(self, fn, get_state):
        self.fn, self.get_state = fn, get_state

    def __call__(self, *args):
        return self.fn(self.get_state(), *args)


@dataclasses.dataclass
class StepSpec:
    """A compiled step and abstract arguments (``jax.ShapeDtypeStruct`` with shardings) to lower it with:
    ``spec.fn.lower(*spec.args).compile()`` needs no real arrays (ahead-of-time compilation)."""

    name: str
    fn: Any
    args: tuple

    def lower(self):
        return self.fn.lower(*self.args)


def abstract_like(tree):
    """``jax.ShapeDtypeStruct`` (with the sharding, when there is one) for every array leaf of ``tree``."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree_util.tree_map(one, tree)


def _reseed(state, key):
    """Replace every PRNG key leaf of an nnx state by a key derived from ``key`` and the leaf's path."""
    def one(path, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            salt = int.from_bytes(hashlib.sha256(path_str(path).encode()).digest()[:3], "little")
            return jax.random.fold_in(key, salt)
        return x

    return jax.tree_util.tree_map_with_path(one, state)


def split_model(model, lora: bool) -> tuple[ModelParts, dict]:
    if lora:
        graphdef, train_state, *frozen = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    else:
        graphdef, train_state, *frozen = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(train_state)
    keys = [path_str(p) for p, _ in leaves]
    trainable = {k: v for k, (_, v) in zip(keys, leaves)}
    copy = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x)
    ref = None if lora else jax.tree_util.tree_map(copy, trainable)
    return ModelParts(graphdef, keys, treedef, tuple(frozen), ref, lora), trainable


def reference_trainable(parts: ModelParts, trainable: dict, state: dict | None = None) -> dict:
    """Trainable leaves of the reference policy: LoRA B zeroed (= the base model) or the initial weights
    (``state["ref"]``; inside a compiled function pass the ``state`` argument)."""
    if parts.lora:
        return {k: (jnp.zeros_like(v) if k.endswith("lora_b") else v) for k, v in trainable.items()}
    return (parts.state() if state is None else state)["ref"]


def forward_logps(model, batch, chunk: int, remat: bool = True, pack_batch: bool = False):
    """Per-sequence log-probs of a batch; shared-prompt batches (``score_targets``, see
    data_pipeline.batching) give two sequences per row, in the unpacked batch's order."""
    shared = "score_targets" in batch
    hidden, _ = model(batch["input_ids"], batch["positions"], batch["segment_ids"],
                      prefix_ids_bt=batch["prefix_ids"] if shared else None)
    w = model.lm_head_weight()
    dt = hidden.dtype

    def head(h):
        return jnp.einsum("...d,vd->...v", h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)

    if shared:
        return scored_sequence_logprobs(hidden, head, batch["score_positions"], batch["score_targets"],
                                        batch["score_sequence"], 2, chunk_size=chunk, with_logits_stats=True,
                                        remat=remat)
    return sequence_logprobs(hidden, head, batch["labels"], chunk_size=chunk, with_logits_stats=True, remat=remat,
                             pack_batch=pack_batch)


# ----------------------------------------------------------------------------- the steps
def make_apply_step(tx, frozen: frozenset = frozenset()):
    """Jitted optimizer step over accumulated gradients (donated): divide by ``n_micro`` (the number of
    micro-batches, or the window's token count for token-mean SFT), clip + AdamW (``tx``), and refuse a
    non-finite update (state left untouched, ``finite=False`` reported). The reported ``grad_norm`` is
    the one clipping sees: over the updated leaves only (``frozen`` paths excluded)."""

    def apply_step(trainable, opt_state, grads_acc, n_micro):
        grads = jax.tree_util.tree_map(lambda g: g / n_micro, grads_acc)
        gnorm = optax.global_norm({k: v for k, v in grads.items() if k not in frozen})
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_params = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(gnorm) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new_params)]))
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, grads_acc)
        return keep(new_params, trainable), keep(new_opt, opt_state), zeros, {"grad_norm": gnorm, "finite": finite}

    return jax.jit(apply_step, donate_argnums=(0, 1, 2))


def token_sum_objective(objective, ocfg: ObjectiveConfig) -> bool:
    """Token-mean SFT: gradients are accumulated as sums and divided by the token count of the whole
    accumulation window, so the accumulated gradient equals the full-batch one."""
    return objective.name == "sft" and ocfg.sft_reduction == "token"


def window_metrics(ms: list[dict], token_sum: bool) -> tuple[dict, float]:
    """Metrics of one accumulation window and the divisor of its summed gradients: the number of
    micro-batches, or (token-mean SFT) the window's loss tokens, the loss then being total NLL / tokens."""
    metrics = mean_metrics(ms)
    if not token_sum:
        return metrics, float(len(ms))
    host = [{k: float(v) for k, v in jax.device_get(m).items()} for m in ms]
    tokens = sum(m["loss_tokens"] for m in host)
    metrics["loss_tokens"] = tokens
    metrics["loss"] = sum(m["loss"] * m["loss_tokens"] for m in host) / tokens if tokens > 0 else 0.0
    return metrics, max(tokens, 1.0)


def make_steps(parts: ModelParts, objective, ocfg: ObjectiveConfig, k: int, chunk: int, tx, seed: int,
               dropout: bool, remat: bool = True, pack_batch: bool = False, frozen: frozenset = frozenset()):
    """``(micro_step, apply_step, eval_step, ref_step)``.

    ``micro_step(trainable, grads_acc, batch, step, micro)``, ``eval_step(trainable, batch)`` and
    ``ref_step(trainable, batch)`` are :class:`BoundStep` s: jitted functions whose first argument is
    ``parts.state()`` (the ``.fn`` attribute), so no array is a constant of a compiled program.
    """
    fns = make_step_fns(parts, objective, ocfg, k, chunk, tx, seed, dropout, remat, pack_batch, frozen)
    bind = lambda f: BoundStep(f, parts.state)
    return bind(fns["micro_step"]), fns["apply_step"], bind(fns["eval_step"]), bind(fns["ref_step"])


def make_step_fns(parts: ModelParts, objective, ocfg: ObjectiveConfig, k: int, chunk: int, tx, seed: int,
                  dropout: bool, remat: bool = True, pack_batch: bool = False,
                  frozen: frozenset = frozenset()) -> dict:
    """The jitted training functions, each taking every array it reads as an argument:

    - ``micro_step(state, trainable, grads_acc, batch, step, micro) -> (grads_acc, metrics)`` (grads_acc
      donated) adds one micro-batch's gradients into ``grads_acc``: of the loss, or for token-mean SFT
      (:func:`token_sum_objective`) of the NLL sum, with ``metrics["loss_tokens"]`` the tokens it covers;
      divide by :func:`window_metrics`' divisor;
    - ``apply_step(trainable, opt_state, grads_acc, n_micro)`` (see :func:`make_apply_step`);
    - ``eval_step(state, trainable, batch) -> metrics``; ``ref_step(state, trainable, batch) -> [B]``.
    """
    needs_ref = objective.needs_reference
    token_sum = token_sum_objective(objective, ocfg)

    def policy(state, trainable, step, train: bool, micro=0):
        if dropout and train:  # masks drawn from (seed, step, micro-batch): reruns and resumes are identical
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)
            return parts.merge(trainable, dropout_key=key, state=state)
        model = parts.merge(trainable, state=state)
        if dropout:
            model.eval()
        return model

    def ref_logps(state, trainable, batch):
        if "ref_logps" in batch:
            return batch["ref_logps"]
        model = policy(state, reference_trainable(parts, trainable, state), 0, False)
        return jax.lax.stop_gradient(forward_logps(model, batch, chunk, True, pack_batch).logp_sum)

    def loss_and_metrics(trainable, state, batch, ref, step, train, micro=0):
        out = forward_logps(policy(state, trainable, step, train, micro), batch, chunk, remat, pack_batch)
        g = out.logp_sum.shape[0] // k
        shape = lambda x: x.reshape(g, k)
        weights = batch["valid"].reshape(g, -1)[:, 0].astype(jnp.float32)  # -1: K or K/2 rows (shared prompt)
        loss, metrics = objective(shape(out.logp_sum), shape(ref) if ref is not None else None,
                                  shape(out.token_count), ocfg, logits_mean=shape(out.logits_mean), weights=weights)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["groups"] = jnp.sum(weights)
        if token_sum:
            counts = shape(out.token_count).astype(jnp.float32)
            tokens = jnp.sum(sum(counts[:, c] for c in CHOSEN_COLUMNS[k]) * weights)
            metrics["loss_tokens"] = tokens
            loss = loss * jax.lax.stop_gradient(tokens)  # the NLL sum; divided by the window's tokens later
        return loss, metrics

    def micro_step(state, trainable, grads_acc, batch, step, micro=0):
        ref = ref_logps(state, trainable, batch) if needs_ref else None
        (loss, metrics), grads = jax.value_and_grad(loss_and_metrics, has_aux=True)(
            trainable, state, batch, ref, step, True, micro)
        grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
        return grads_acc, metrics

    def eval_step(state, trainable, batch):
        ref = ref_logps(state, trainable, batch) if needs_ref else None
        _, metrics = loss_and_metrics(trainable, state, batch, ref, 0, False)
        return metrics

    def ref_only(state, trainable, batch):
        return ref_logps(state, trainable, {k: v for k, v in batch.items() if k != "ref_logps"})

    return {"micro_step": jax.jit(micro_step, donate_argnums=(2,)), "apply_step": make_apply_step(tx, frozen),
            "eval_step": jax.jit(eval_step), "ref_step": jax.jit(ref_only)}


# ----------------------------------------------------------------------------- abstract steps (AOT)
def _abstract_leaf(path, x, mesh):
    """ShapeDtypeStruct of a parameter/state leaf sharded by :data:`PARAM_RULES` (replicated when no rule)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from iopo_jax.sharding import param_spec

    if mesh is None:
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    try:
        spec = param_spec(path if isinstance(path, str) else path_str(path), x.shape, mesh)
    except KeyError:
        spec = PartitionSpec()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def abstract_opt_state(tx, trainable: dict):
    """The optimizer state of ``tx`` for abstract ``trainable`` leaves: moments sharded like their
    parameter (matched by the parameter's path in the state tree), counters replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    shapes = jax.eval_shape(tx.init, trainable)
    mesh = next((x.sharding.mesh for x in trainable.values() if isinstance(getattr(x, "sharding", None), NamedSharding)),
                None)

    def one(path, x):
        for p in reversed(path):
            key = getattr(p, "key", None)
            if isinstance(key, str) and key in trainable and tuple(trainable[key].shape) == tuple(x.shape):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(trainable[key], "sharding", None))
        sh = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(one, shapes)


def abstract_model_parts(model_cfg, mesh, lora: bool) -> tuple[ModelParts, dict]:
    """:class:`ModelParts` and trainable leaves whose arrays are all ``jax.ShapeDtypeStruct`` sharded over
    ``mesh`` as loading would shard them; nothing is allocated (``mesh`` may hold devices of a TPU
    topology this machine does not have)."""
    from iopo_jax.models.weights import abstract_model

    graphdef, params, rest = abstract_model(model_cfg)
    parts, trainable = split_model(nnx.merge(graphdef, params, rest), lora=lora)
    trainable = {k: _abstract_leaf(k, v, mesh) for k, v in trainable.items()}
    frozen = tuple(jax.tree_util.tree_map_with_path(lambda p, x: _abstract_leaf(p, x, mesh), f) for f in parts.frozen)
    ref = None if lora else dict(trainable)
    return dataclasses.replace(parts, frozen=frozen, ref_trainable=ref), trainable


def abstract_batch(mesh, rows: int, seq_len: int, extra: dict | None = None) -> dict:
    """A training batch of ``rows`` sequences of ``seq_len`` tokens (global shapes), sharded like
    :func:`device_batch` shards it. ``extra``: more keys, ``name -> (shape, dtype)``."""
    spec = {k: ((rows, seq_len), jnp.int32) for k in BATCH_KEYS[:4]}  # the plain layout (no shared prompt)
    spec["valid"] = ((rows,), jnp.bool_)
    spec.update(extra or {})
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, len(shape), shape) if mesh else None)
            for k, (shape, dt) in spec.items()}


def train_step_specs(fns: dict, parts: ModelParts, trainable: dict, opt_state, mesh, rows: int, seq_len: int,
                     ref_logps: bool = False) -> dict[str, StepSpec]:
    """:class:`StepSpec` of every offline-training step (``micro_step``, ``apply_step``, ``eval_step``,
    ``ref_step``) for a global batch of ``rows`` sequences of ``seq_len`` tokens; ``ref_logps``: the batch
    carries precomputed reference log-probs (``objective.reference=precompute``)."""
    from jax.sharding import NamedSharding, PartitionSpec

    state, tr, opt = abstract_like(parts.state()), abstract_like(trainable), abstract_like(opt_state)
    rep = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
    batch = abstract_batch(mesh, rows, seq_len, {"ref_logps": ((rows,), jnp.float32)} if ref_logps else None)
    plain = abstract_batch(mesh, rows, seq_len)
    return {
        "micro_step": StepSpec("micro_step", fns["micro_step"],
                               (state, tr, tr, batch, scalar(jnp.int32), scalar(jnp.int32))),
        "apply_step": StepSpec("apply_step", fns["apply_step"], (tr, opt, tr, scalar(jnp.float32))),
        "eval_step": StepSpec("eval_step", fns["eval_step"], (state, tr, batch)),
        "ref_step": StepSpec("ref_step", fns["ref_step"], (state, tr, plain)),
    }


def abstract_train_specs(cfg, mesh, model_cfg=None, rows: int | None = None, seq_len: int | None = None
                         ) -> dict[str, StepSpec]:
    """Every offline-training step of ``cfg`` with abstract arguments on ``mesh``, without loading weights
    or data (ahead-of-time compilation, e.g. for a TPU topology)::

        for spec in abstract_train_specs(cfg, mesh).values():
            compiled = spec.lower().compile()

    ``model_cfg`` (a :class:`~iopo_jax.models.config.ModelConfig`) defaults to ``config.json`` of
    ``cfg.model.path`` with the config's dtypes, remat and LoRA; ``rows`` defaults to the global micro-batch
    (``data.batch_size`` x group size), ``seq_len`` to ``data.cutoff_len``.
    """
    from iopo_jax.models.config import ModelConfig

    check_config(cfg)
    if cfg.data.get("share_prompt", False):
        raise ValueError("abstract_train_specs: data.share_prompt=True batches (shared-prompt rows with score "
                         "slots) have no abstract layout yet; compile with --set data.share_prompt=False")
    lcfg = lora_config(cfg)
    if model_cfg is None:
        model_cfg = ModelConfig.from_hf(cfg.model.path, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                                        remat=cfg.model.remat, attention_impl=cfg.model.attention_impl,
                                        attention_block=cfg.model.attention_block, lora=lcfg)
    parts, trainable = abstract_model_parts(model_cfg, mesh, lora=lcfg is not None)
    k = K_OF_KIND[cfg.data.kind]
    objective = get_objective(cfg.objective.name)
    tx = make_optimizer(cfg.optimizer, max(cfg.train.max_steps, 1), trainable)
    fns = make_step_fns(parts, objective, ObjectiveConfig.from_mapping(objective_hparams(cfg)), k,
                        cfg.train.logprob_chunk, tx, cfg.train.seed, dropout=lcfg is not None and lcfg.dropout > 0,
                        remat=cfg.train.logprob_remat, pack_batch=cfg.train.logprob_pack_batch,
                        frozen=frozen_keys(cfg.optimizer, trainable))
    rows = rows or cfg.data.batch_size * k
    seq_len = seq_len or cfg.data.cutoff_len
    precompute = cfg.objective.reference == "precompute" and objective.needs_reference
    return train_step_specs(fns, parts, trainable, abstract_opt_state(tx, trainable), mesh, rows, seq_len,
                            ref_logps=precompute)


# ----------------------------------------------------------------------------- helpers
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions",
              "prefix_ids", "score_positions", "score_targets", "score_sequence")  # the last 4: shared prompt


def device_batch(batch: dict, mesh) -> dict:
    """numpy batch -> global arrays sharded over (data, fsdp) (each host passes its local rows)."""
    out = {}
    for key in BATCH_KEYS + ("valid", "ref_logps"):
        if key not in batch:
            continue
        x = np.asarray(batch[key])
        if mesh is None:
            out[key] = jnp.asarray(x)
        else:
            global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            sh = batch_sharding(mesh, x.ndim, global_shape)
            out[key] = jax.make_array_from_process_local_data(sh, x, global_shape)
    if "valid" not in out:
        out["valid"] = jnp.ones((out["input_ids"].shape[0],), bool) if mesh is None else jax.make_array_from_process_local_data(
            batch_sharding(mesh, 1, (batch["input_ids"].shape[0] * jax.process_count(),)),
            np.ones((batch["input_ids"].shape[0],), bool))
    return out


def host_rows(x) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the rows it passed to :func:`device_batch`)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0 if sh.index else 0
        shards.setdefault(start, sh.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def mean_metrics(ms: list[dict]) -> dict:
    """Average metric dicts, weighting by the number of real groups in each."""
    if not ms:
        return {}
    host = [{k: float(v) for k, v in jax.device_get(m).items()} for m in ms]
    w = np.array([m.get("groups", 1.0) for m in host])
    w = w if w.sum() > 0 else np.ones_like(w)
    out = {}
    for k in host[0]:
        if k == "groups":
            out[k] = float(w.sum())
            continue
        out[k] = float(np.sum([m[k] * wi for m, wi in zip(host, w)]) / w.sum())
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """SIGTERM (what TPU VMs, Kubernetes and SLURM send before taking a machine) sets a flag instead of
    killing the process; the loop asks :meth:`should_stop` at every step boundary, saves a checkpoint and
    returns. With several processes every process stops at the same step (the flags are all-gathered).
    A second SIGTERM while the first is pending kills the process as usual."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handler(self, signum, frame):
        if self.requested:  # second signal: give up waiting for the step boundary
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([int(self.requested)], np.int32))
        return bool(np.asarray(flags).max())


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything from a config and runs the loop. ``devices``: restrict the mesh (tests)."""

    def __init__(self, cfg, workdir: str, devices=None, progress: bool = True):
        check_config(cfg)
        self.cfg = cfg
        self.workdir = str(paths.makedirs(workdir))  # local: absolute; gs://...: kept (see iopo_jax.paths)
        self.progress = progress
        self.mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
        self.k = K_OF_KIND[cfg.data.kind]
        self.objective = get_objective(cfg.objective.name)
        self.ocfg = ObjectiveConfig.from_mapping(objective_hparams(cfg))


    def setup(self):
        cfg = self.cfg
        from data_pipeline import build_data
        from iopo_jax.tokenizer import load_tokenizer

        model_dir = resolve_model_dir(cfg)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir)
        self.data = build_data(data_config(cfg, self.workdir), self.tokenizer)
        log.info("%s", self.data.summary_text())
        lcfg = lora_config(cfg)
        with use_mesh(self.mesh):
            model, self.model_cfg = load_model(model_dir, mesh=self.mesh, seed=cfg.train.seed,
                                               param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                                               remat=cfg.model.remat, attention_impl=cfg.model.attention_impl, scan_layers=cfg.model.get("scan_layers", False),
                                               attention_block=cfg.model.attention_block,
                                               lora=lcfg)
        self.model_dir = model_dir
        self.parts, trainable = split_model(model, lora=lcfg is not None)
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else optimizer_steps(
            self.data.train, cfg.data.num_epochs, cfg.optimizer.grad_accum)
        self.schedule = make_schedule(cfg.optimizer, self.total_steps)
        self.tx = make_optimizer(cfg.optimizer, self.total_steps, trainable)
        with use_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init)(trainable)
        self.trainable, self.opt_state = trainable, opt_state
        self.step_fns = make_step_fns(
            self.parts, self.objective, self.ocfg, self.k, cfg.train.logprob_chunk, self.tx, cfg.train.seed,
            dropout=lcfg is not None and lcfg.dropout > 0, remat=cfg.train.logprob_remat,
            pack_batch=cfg.train.logprob_pack_batch, frozen=frozen_keys(cfg.optimizer, trainable))
        self.token_sum = token_sum_objective(self.objective, self.ocfg)
        bind = lambda name: BoundStep(self.step_fns[name], self.parts.state)
        self.micro_step, self.eval_step, self.ref_step = bind("micro_step"), bind("eval_step"), bind("ref_step")
        self.apply_step = self.step_fns["apply_step"]
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
        self.ref_table = None
        if cfg.objective.reference == "precompute" and self.objective.needs_reference:
            self.ref_table = self._precompute_reference()
        return self

    def step_specs(self, rows: int | None = None, seq_len: int | None = None) -> dict[str, StepSpec]:
        """Every jitted step with abstract arguments shaped and sharded like this run's (after
        :meth:`setup`): ``spec.fn.lower(*spec.args)`` compiles it without touching the arrays.
        ``rows`` (global sequences per micro-batch) defaults to ``data.batch_size`` x group size,
        ``seq_len`` to ``data.cutoff_len``."""
        return train_step_specs(self.step_fns, self.parts, self.trainable, self.opt_state, self.mesh,
                                rows or self.cfg.data.batch_size * self.k, seq_len or self.cfg.data.cutoff_len,
                                ref_logps=self.ref_table is not None)

    # -- reference log-probs, once per dataset
    def _precompute_reference(self) -> dict:
        from data_pipeline.batching import BatchIterator

        tables = {}
        for split, ds in (("train", self.data.train_dataset), ("val", self.data.val_dataset)):
            if ds is None:
                continue
            fp = reference_cache_key(ds.fingerprint, self.model_dir, self.cfg, self.k)
            path = os.path.join(self.workdir, f"ref_logps_{split}_{fp}_p{jax.process_index()}.npz")
            if paths.workdir_path(path).exists():
                z = paths.load_npz(path)
                tables[split] = dict(zip(z["index"].tolist(), z["logps"]))
                continue
            it = BatchIterator(ds, self.data.train.batch_size, shuffle=False, num_epochs=1, drop_last=False,
                               buckets=list(self.data.train.buckets), allgather=self.data.train.allgather)
            idx, vals = [], []
            with use_mesh(self.mesh):
                for batch in it:
                    lp = host_rows(self.ref_step(self.trainable, device_batch(batch, self.mesh)))
                    lp = lp.reshape(-1, self.k)
                    for j, ex in enumerate(np.asarray(batch["example_index"])):
                        if ex >= 0:
                            idx.append(int(ex))
                            vals.append(lp[j])
            paths.save_npz(path, index=np.array(idx, np.int64), logps=np.array(vals, np.float32).reshape(-1, self.k))
            tables[split] = dict(zip(idx, vals))
            log.info("precomputed reference log-probs for %d %s groups -> %s", len(idx), split, path)
        return tables

    def _with_ref(self, batch: dict, split: str) -> dict:
        if self.ref_table is None:
            return batch
        table = self.ref_table[split]
        rows = []
        for ex in np.asarray(batch["example_index"]):
            rows.append(table[int(ex)] if ex >= 0 else np.zeros(self.k, np.float32))
        batch = dict(batch)
        batch["ref_logps"] = np.concatenate(rows).astype(np.float32)
        return batch

    # -- evaluation
    def evaluate(self) -> dict:
        from data_pipeline.pipeline import fresh_val_iterator

        it = fresh_val_iterator(self.data)
        if it is None:
            return {}
        ms = []
        with use_mesh(self.mesh):
            for batch in it:
                ms.append(self.eval_step(self.trainable, device_batch(self._with_ref(batch, "val"), self.mesh)))
        return window_metrics(ms, self.token_sum)[0] if ms else {}

    # -- checkpoints
    def _arrays(self):
        return {"params": self.trainable, "opt_state": self.opt_state}

    def save(self, step: int):
        meta = {"step": step, "data": self.data.train.get_state(), "total_steps": self.total_steps}
        self.ckpt.save(step, self._arrays(), meta)

    def try_restore(self) -> int:
        arrays, meta = self.ckpt.restore(self._arrays())
        if arrays is None:
            return 0
        if meta.get("total_steps") != self.total_steps:
            raise ValueError(f"the checkpoint in {self.ckpt.directory} was made for {meta.get('total_steps')} steps, "
                             f"this config runs {self.total_steps}; use a fresh --workdir")
        self.trainable, self.opt_state = arrays["params"], arrays["opt_state"]
        self.data.train.set_state(meta["data"])
        log.info("resumed from step %d (%s)", meta["step"], self.ckpt.directory)
        return int(meta["step"])

    # -- the loop
    def run(self) -> dict:
        if not hasattr(self, "trainable"):
            self.setup()
        cfg = self.cfg
        logger = MetricsLogger(self.workdir, tensorboard=cfg.train.tensorboard)
        start = self.try_restore()
        history = {"train": [], "eval": []}
        if start == 0:
            ev = self.evaluate()
            if ev:
                logger.write(0, "eval", ev)
                history["eval"].append((0, ev))
        accum = cfg.optimizer.grad_accum
        grads_acc = jax.tree_util.tree_map(jnp.zeros_like, self.trainable)
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=start, desc=f"{cfg.objective.name}", dynamic_ncols=True,
                   disable=not self.progress or jax.process_index() != 0)
        it = iter(self.data.train)
        step = start
        last_saved = start
        preempted = False
        guard = PreemptionGuard().__enter__()
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                ms, tokens = [], 0
                with use_mesh(self.mesh):
                    for micro in range(accum):
                        try:
                            batch = next(it)
                        except StopIteration:
                            break
                        tokens += int(np.asarray(batch["segment_ids"] > 0).sum()) * jax.process_count()
                        dbatch = device_batch(self._with_ref(batch, "train"), self.mesh)
                        grads_acc, m = self.micro_step(self.trainable, grads_acc, dbatch, jnp.int32(step),
                                                       jnp.int32(micro))
                        ms.append(m)
                    if not ms:
                        break
                    metrics, divisor = window_metrics(ms, self.token_sum)
                    self.trainable, self.opt_state, grads_acc, info = self.apply_step(
                        self.trainable, self.opt_state, grads_acc, jnp.float32(divisor))
                info = jax.device_get(info)
                metrics["grad_norm"] = float(info["grad_norm"])
                if not bool(info["finite"]) or not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(
                        f"non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}, "
                        f"grad_norm={metrics['grad_norm']}); the update was not applied and the last good "
                        f"checkpoint (step {last_saved}) in {self.ckpt.directory} is intact. Lower optimizer.lr, "
                        "check the data, or use param_dtype=float32.")
                step += 1
                dt = time.perf_counter() - t0
                metrics["lr"] = float(self.schedule(step - 1))
                metrics["tokens_per_s"] = tokens / dt
                history["train"].append((step, metrics))
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    logger.write(step, "train", metrics)
                acc = [metrics[k] for k in ("rewards/accuracies_v1", "rewards/accuracies_v2", "rewards/accuracies") if k in metrics]
                post = {"loss": _fmt(metrics["loss"]), "tok/s": f"{metrics['tokens_per_s']:.0f}"}
                if acc:
                    post["acc"] = _fmt(float(np.mean(acc)))
                bar.set_postfix(post)
                bar.update(1)
                if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < self.total_steps:
                    ev = self.evaluate()
                    if ev:
                        logger.write(step, "eval", ev)
                        history["eval"].append((step, ev))
                if step % cfg.checkpoint.every == 0 and step < self.total_steps:
                    self.save(step)
                    last_saved = step
                if step < self.total_steps and guard.should_stop():
                    preempted = True
                    break
            bar.close()
            if step > last_saved:
                self.save(step)
            self.ckpt.wait()
            if preempted:
                log.warning("preempted: checkpoint of step %d saved in %s; rerun the same command to resume",
                            step, self.ckpt.directory)
                return {"steps": step, "preempted": True, "checkpoint": self.ckpt.directory}
            ev = self.evaluate()
            if ev:
                logger.write(step, "eval", ev)
                history["eval"].append((step, ev))
        finally:
            guard.__exit__()
            bar.close()
            self.ckpt.wait()
            logger.close()
        result = self._finish(step, history)
        return result

    def _finish(self, step: int, history: dict) -> dict:
        cfg = self.cfg
        exports = {}
        if cfg.model.finetune == "lora" and cfg.export.peft:
            from iopo_jax.models.lora import export_peft

            out = os.path.join(self.workdir, "export", "adapter")
            with paths.local_dir_for(out) as local:
                export_peft(self.parts.merge(self.trainable), local,
                            base_model_name_or_path=os.path.abspath(self.model_dir)
                            if os.path.isdir(self.model_dir) else self.model_dir)
            exports["adapter"] = out
        if cfg.export.merged:
            from iopo_jax.models.lora import export_merged
            from iopo_jax.models.weights import copy_tokenizer

            out = os.path.join(self.workdir, "export", "merged")
            with paths.local_dir_for(out) as local:
                export_merged(self.parts.merge(self.trainable), local, dtype=cfg.export.dtype)
                if jax.process_index() == 0:
                    copy_tokenizer(cfg.model.tokenizer or self.model_dir, local)
            exports["merged"] = out
        summary = summarize(history)
        summary["steps"] = step
        summary["exports"] = exports
        summary["data"] = self.data.summary
        if jax.process_index() == 0:
            paths.write_text(os.path.join(self.workdir, "summary.json"), json.dumps(summary, indent=2, default=str))
            if cfg.train.plot:
                summary["plot"] = plot_curves(history, os.path.join(self.workdir, "training_curves.png"))
        return summary


def summarize(history: dict) -> dict:
    """First/last figures for the end-of-run report."""
    out: dict = {}
    tr = history["train"]
    if tr:
        tail = [m for _, m in tr[-max(1, len(tr) // 10):]]
        out["train_last"] = {k: float(np.mean([m[k] for m in tail])) for k in tail[0]}
        out["train_first"] = tr[0][1]
    ev = history["eval"]
    if ev:
        out["eval_first"] = ev[0][1]
        out["eval_last"] = ev[-1][1]
    return out


def plot_curves(history: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tr, ev = history["train"], history["eval"]
    win = max(1, len(tr) // 15)

    def smooth(xs):  # trailing moving average, so noisy per-step values stay readable
        c = np.cumsum(np.insert(np.asarray(xs, float), 0, 0.0))
        return [(c[i + 1] - c[max(0, i + 1 - win)]) / (i + 1 - max(0, i + 1 - win)) for i in range(len(xs))]

    if tr:
        axes[0].plot([s for s, _ in tr], [m["loss"] for _, m in tr], color="C0", alpha=0.25)
        axes[0].plot([s for s, _ in tr], smooth([m["loss"] for _, m in tr]), color="C0",
                     label=f"train loss (mean of {win} steps)")
    if ev:
        axes[0].plot([s for s, _ in ev], [m["loss"] for _, m in ev], "o-", color="C1", label="validation loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    keys = [k for k in ("rewards/accuracies_v1", "rewards/accuracies_v2", "rewards/accuracies") if tr and k in tr[0][1]]
    for i, k in enumerate(keys):
        axes[1].plot([s for s, _ in tr], smooth([m[k] for _, m in tr]), color=f"C{2 * i}",
                     label=f"train {k.split('/')[-1]} (mean of {win} steps)")
        if ev and k in ev[0][1]:
            axes[1].plot([s for s, _ in ev], [m[k] for _, m in ev], "o-", color=f"C{2 * i + 1}",
                         label=f"val {k.split('/')[-1]}")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("step")
    axes[1].set_title("reward accuracy")
    if keys:
        axes[1].legend()
    fig.tight_layout()
    paths.write_bytes(path, _png(fig))
    plt.close(fig)
    return path


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


class MetricsLogger:
    """metrics.jsonl (appended, flushed per line) + TensorBoard events (process 0 only); ``workdir`` may
    be local or an object-store URI (see :mod:`iopo_jax.paths`)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.f = paths.AppendFile(os.path.join(workdir, "metrics.jsonl")) if self.enabled else None
        self.tb = None
        if self.enabled and tensorboard:
            try:
                self.tb = paths.summary_writer(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover
                log.warning("tensorboardX is not installed; no TensorBoard events")

    def write(self, step: int, split: str, metrics: dict):
        if not self.enabled:
            return
        rec = {"step": step, "split": split, "time": time.time(), **metrics}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
