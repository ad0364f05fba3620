"""Offline preference / SFT training: the jitted steps, evaluation and :class:`Trainer`, which runs them
on the shared skeleton (:class:`iopo_jax.train_loop.TrainLoop`: model state, optimizer, checkpoints,
metrics, preemption, exports).

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
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import DataConfig, build_data
from data_pipeline.batching import BatchIterator
from data_pipeline.pipeline import fresh_val_iterator
from data_pipeline.hashing import sha256_hex
from data_pipeline.tokenization import NUM_SEQUENCES
from iopo_jax import paths
from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import lm_head_logits
from iopo_jax.models.weights import abstract_model
from iopo_jax.logprobs import scored_sequence_logprobs, sequence_logprobs
from iopo_jax.objectives import ObjectiveConfig, get_objective
from iopo_jax.objectives.losses import CHOSEN_COLUMNS
from iopo_jax.sharding import batch_sharding, host_local_rows, param_spec, path_str, put_local_rows, use_mesh
# the shared skeleton and model/optimizer plumbing (re-exported here for the existing importers)
from iopo_jax.train_loop import (BoundStep, MetricsLogger, ModelParts, PreemptionGuard, StepSpec,  # noqa: F401
                                 TrainingDiverged, TrainLoop, abstract_like, check_common_config,
                                 config_error, decays, export_model, frozen_keys, lora_config, make_apply_step,
                                 make_optimizer, make_schedule, model_overrides, reference_trainable,
                                 resolve_model_dir, split_model)

log = logging.getLogger("iopo_jax.train")


# ----------------------------------------------------------------------------- config checks
def check_config(cfg) -> None:
    """Fail early, naming the field, on values the run cannot use."""
    def bad(field, value, why):
        raise config_error(field, value, why)

    check_common_config(cfg)
    if cfg.data.kind not in NUM_SEQUENCES:
        bad("data.kind", cfg.data.kind, f"must be one of {sorted(NUM_SEQUENCES)}")
    obj = get_objective(cfg.objective.name)  # raises with the valid names
    k = NUM_SEQUENCES[cfg.data.kind]
    if k not in obj.group_sizes:
        bad("objective.name", cfg.objective.name,
            f"needs groups of {obj.group_sizes} sequences but data.kind={cfg.data.kind!r} gives {k}")
    if cfg.data.get("share_prompt", False) and k == 1:
        bad("data.share_prompt", True, "shares a prompt between the answers of IOPO groups or DPO pairs, not SFT")
    if cfg.optimizer.grad_accum < 1:
        bad("optimizer.grad_accum", cfg.optimizer.grad_accum, "must be >= 1")
    ObjectiveConfig.from_mapping(cfg.objective)  # the other objective values, naming the field


def data_config(cfg, workdir: str):
    """The ``data`` section as a :class:`data_pipeline.DataConfig`; the tokenisation cache defaults to
    ``<workdir>/data_cache``."""
    d = DataConfig.from_mapping(cfg.data)
    return dataclasses.replace(d, cache_dir=d.cache_dir or os.path.join(workdir, "data_cache"))


# ----------------------------------------------------------------------------- reference cache, step count
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
    return sha256_hex("\n".join(entries))


def reference_cache_key(data_fingerprint: str, model_dir: str, cfg, k: int) -> str:
    """Key of a precomputed reference log-prob table: the data, the checkpoint (path and identity), the
    parameter and compute dtypes and the group size."""
    parts = [data_fingerprint, os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir,
             checkpoint_identity(model_dir), cfg.model.param_dtype, cfg.model.dtype, str(k)]
    return sha256_hex("|".join(map(str, parts)))[:16]


def optimizer_steps(train_it, num_epochs, grad_accum: int) -> int:
    """Optimizer steps that use every micro-batch of ``num_epochs`` epochs: ceil(micro-batches / grad_accum)
    (the last step accumulates the remainder). ``num_epochs`` None/0 counts one epoch."""
    micro = len(train_it) if num_epochs else train_it.steps_per_epoch
    if micro < 1:
        raise ValueError(f"the training set gives no micro-batch (data.batch_size={train_it.batch_size} rows "
                         "each); lower data.batch_size or add data")
    return -(-micro // grad_accum)


# ----------------------------------------------------------------------------- log-probs
def forward_logps(model, batch, chunk: int, remat: bool = True, pack_batch: bool = False):
    """Per-sequence log-probs of a batch; shared-prompt batches (``score_targets``, see
    data_pipeline.batching) give two sequences per row, in the unpacked batch's order."""
    shared = "score_targets" in batch
    hidden, _ = model(batch["input_ids"], batch["positions"], batch["segment_ids"],
                      prefix_ids_bt=batch["prefix_ids"] if shared else None)
    w = model.lm_head_weight()
    dt = hidden.dtype

    def head(h):
        return lm_head_logits(h, w, dt)

    if shared:
        return scored_sequence_logprobs(hidden, head, batch["score_positions"], batch["score_targets"],
                                        batch["score_sequence"], 2, chunk_size=chunk, with_logits_stats=True,
                                        remat=remat)
    return sequence_logprobs(hidden, head, batch["labels"], chunk_size=chunk, with_logits_stats=True, remat=remat,
                             pack_batch=pack_batch)


# ----------------------------------------------------------------------------- the steps
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
    check_config(cfg)
    if cfg.data.get("share_prompt", False):
        raise ValueError("abstract_train_specs: data.share_prompt=True batches (shared-prompt rows with score "
                         "slots) have no abstract layout yet; compile with --set data.share_prompt=False")
    lcfg = lora_config(cfg)
    if model_cfg is None:
        model_cfg = ModelConfig.from_hf(cfg.model.path, **model_overrides(cfg))
    parts, trainable = abstract_model_parts(model_cfg, mesh, lora=lcfg is not None)
    k = NUM_SEQUENCES[cfg.data.kind]
    objective = get_objective(cfg.objective.name)
    tx = make_optimizer(cfg.optimizer, max(cfg.train.max_steps, 1), trainable)
    fns = make_step_fns(parts, objective, ObjectiveConfig.from_mapping(cfg.objective), k,
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
    out = {key: put_local_rows(batch[key], mesh) for key in BATCH_KEYS + ("valid", "ref_logps") if key in batch}
    if "valid" not in out:
        out["valid"] = put_local_rows(np.ones((np.shape(batch["input_ids"])[0],), bool), mesh)
    return out


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


# ----------------------------------------------------------------------------- the trainer
class Trainer(TrainLoop):
    """Offline training (SFT, DPO, IOPO and relatives) on :class:`TrainLoop`: the data pipeline's
    batches, gradient accumulation over micro-batches, reference log-probs (online or precomputed) and
    validation. ``devices``: restrict the mesh (tests)."""

    def __init__(self, cfg, workdir: str, devices=None, progress: bool = True):
        check_config(cfg)
        super().__init__(cfg, workdir, devices, progress)
        self.k = NUM_SEQUENCES[cfg.data.kind]
        self.objective = get_objective(cfg.objective.name)
        self.ocfg = ObjectiveConfig.from_mapping(cfg.objective)
        self.history = {"train": [], "eval": []}

    # -- setup (see TrainLoop.setup)
    def setup_data(self):
        self.data = build_data(data_config(self.cfg, self.workdir), self.tokenizer)
        log.info("%s", self.data.summary_text())

    def plan(self) -> tuple[int, int]:
        cfg = self.cfg
        total = cfg.train.max_steps if cfg.train.max_steps > 0 else optimizer_steps(
            self.data.train, cfg.data.num_epochs, cfg.optimizer.grad_accum)
        return total, total

    def build_steps(self) -> dict:
        cfg, lcfg = self.cfg, lora_config(self.cfg)
        return make_step_fns(
            self.parts, self.objective, self.ocfg, self.k, cfg.train.logprob_chunk, self.tx, cfg.train.seed,
            dropout=lcfg is not None and lcfg.dropout > 0, remat=cfg.train.logprob_remat,
            pack_batch=cfg.train.logprob_pack_batch, frozen=frozen_keys(cfg.optimizer, self.trainable))

    def setup_extra(self):
        self.token_sum = token_sum_objective(self.objective, self.ocfg)
        self.micro_step, self.eval_step, self.ref_step = map(self.bound, ("micro_step", "eval_step", "ref_step"))
        self.ref_table = None
        if self.cfg.objective.reference == "precompute" and self.objective.needs_reference:
            self.ref_table = self._precompute_reference()

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
                    lp = host_local_rows(self.ref_step(self.trainable, device_batch(batch, self.mesh)))
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
        it = fresh_val_iterator(self.data)
        if it is None:
            return {}
        ms = []
        with use_mesh(self.mesh):
            for batch in it:
                ms.append(self.eval_step(self.trainable, device_batch(self._with_ref(batch, "val"), self.mesh)))
        return window_metrics(ms, self.token_sum)[0] if ms else {}

    # -- checkpoints (the side-car; TrainLoop saves and restores the arrays)
    def checkpoint_meta(self, step: int) -> dict:
        return {"data": self.data.train.get_state(), "total_steps": self.total_steps}

    def restore_meta(self, meta: dict):
        if meta.get("total_steps") != self.total_steps:
            raise ValueError(f"the checkpoint in {self.ckpt.directory} was made for {meta.get('total_steps')} steps, "
                             f"this config runs {self.total_steps}; use a fresh --workdir")
        self.data.train.set_state(meta["data"])

    # -- the loop (see TrainLoop.run)
    def _evaluate_and_log(self, step: int, logger):
        ev = self.evaluate()
        if ev:
            logger.write(step, "eval", ev)
            self.history["eval"].append((step, ev))

    def begin(self, start: int, logger):
        self.history = {"train": [], "eval": []}
        if start == 0:
            self._evaluate_and_log(0, logger)
        self._grads_acc = jax.tree_util.tree_map(jnp.zeros_like, self.trainable)
        self._batches = iter(self.data.train)

    def train_step(self, step: int) -> dict | None:
        """One optimizer step over ``optimizer.grad_accum`` micro-batches (fewer at the end of the data;
        ``None`` when none is left)."""
        t0 = time.perf_counter()
        ms, tokens = [], 0
        with use_mesh(self.mesh):
            for micro in range(self.cfg.optimizer.grad_accum):
                try:
                    batch = next(self._batches)
                except StopIteration:
                    break
                tokens += int(np.asarray(batch["segment_ids"] > 0).sum()) * jax.process_count()
                dbatch = device_batch(self._with_ref(batch, "train"), self.mesh)
                self._grads_acc, m = self.micro_step(self.trainable, self._grads_acc, dbatch, jnp.int32(step),
                                                     jnp.int32(micro))
                ms.append(m)
            if not ms:
                return None
            metrics, divisor = window_metrics(ms, self.token_sum)
            self.trainable, self.opt_state, self._grads_acc, info = self.apply_step(
                self.trainable, self.opt_state, self._grads_acc, jnp.float32(divisor))
        info = jax.device_get(info)
        metrics["grad_norm"] = float(info["grad_norm"])
        self.check_update(step, info, metrics["loss"])
        dt = time.perf_counter() - t0
        metrics["lr"] = float(self.schedule(step))
        metrics["tokens_per_s"] = tokens / dt
        self.history["train"].append((step + 1, metrics))
        return metrics

    def postfix(self, metrics: dict) -> dict:
        post = {"loss": _fmt(metrics["loss"]), "tok/s": f"{metrics['tokens_per_s']:.0f}"}
        acc = [metrics[k] for k in ("rewards/accuracies_v1", "rewards/accuracies_v2", "rewards/accuracies") if k in metrics]
        if acc:
            post["acc"] = _fmt(float(np.mean(acc)))
        return post

    def after_step(self, step: int, logger):
        every = self.cfg.train.eval_every
        if every > 0 and step % every == 0 and step < self.total_steps:
            self._evaluate_and_log(step, logger)

    def end(self, step: int, logger):
        self._evaluate_and_log(step, logger)

    # -- the end (see TrainLoop.finish)
    def summarize(self, step: int) -> dict:
        summary = summarize(self.history)
        summary["data"] = self.data.summary
        return summary

    def plot(self, path: str) -> str:
        return plot_curves(self.history, path)


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
    paths.write_png(path, fig)
    plt.close(fig)
    return path


