"""The one training skeleton shared by offline training (:class:`iopo_jax.trainer.Trainer`: SFT, DPO,
IOPO and relatives) and online RL (:class:`iopo_jax.rl.loop.RLTrainer`: SegPO, GRPO).

:class:`TrainLoop` owns everything that does not depend on the objective:

- the model state: the policy loaded on the mesh and cut into ``trainable`` leaves (LoRA factors or all
  weights) and frozen :class:`ModelParts`, compiled steps bound to that state (:class:`BoundStep`);
- the optimizer (AdamW with clipping, freeze masks and the LR schedule) and its state;
- checkpoints (orbax: trainable weights, optimizer state, a JSON side-car with the subclass's position
  in its data), restore and exact resume;
- metrics (``metrics.jsonl``, TensorBoard events, the progress bar; written by process 0 only);
- divergence (a non-finite loss or update stops the run with :class:`TrainingDiverged`; the update is
  refused inside the compiled apply step, so the last checkpoint stays good);
- preemption (SIGTERM -> checkpoint at the next step boundary, all processes agreeing; see
  :class:`PreemptionGuard`);
- the end of a run: PEFT adapter and merged exports (every process takes part in the gathers, process 0
  writes), the curves plot and ``summary.json``.

A subclass implements its data and its step: :meth:`TrainLoop.setup_data`, :meth:`TrainLoop.plan`,
:meth:`TrainLoop.build_steps`, :meth:`TrainLoop.train_step`, the checkpoint side-car
(:meth:`TrainLoop.checkpoint_meta` / :meth:`TrainLoop.restore_meta`) and, as hooks, its own evaluation,
log line, progress-bar figures, summary and plot.
"""
from __future__ import annotations

import dataclasses
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

from data_pipeline.hashing import sha256_int
from data_pipeline.schema import from_mapping, parse_list, section_fields
from data_pipeline.tokenizer import load_tokenizer
from iopo_jax import paths
from iopo_jax.checkpoint import Checkpointer
from iopo_jax.models.config import LORA_TARGETS_ALL, LoRAConfig, ModelConfig
from iopo_jax.models.lora import export_merged, export_peft
from iopo_jax.models.weights import copy_tokenizer, load_model
from iopo_jax.sharding import make_mesh, path_str, use_mesh
from iopo_jax.tools.make_tiny_model import make_tiny_model

log = logging.getLogger("iopo_jax.train")


class TrainingDiverged(FloatingPointError):
    """Loss or gradients became NaN/Inf."""


# ----------------------------------------------------------------------------- config
def config_error(field: str, value, why: str) -> ValueError:
    return ValueError(f"config.{field}={value!r}: {why}")


def check_common_config(cfg) -> None:
    """The checks every run shares (model, optimizer, LoRA targets, freeze patterns), naming the field."""
    def bad(field, value, why):
        raise config_error(field, value, why)

    if cfg.model.finetune not in ("lora", "full"):
        bad("model.finetune", cfg.model.finetune, "must be 'lora' or 'full'")
    if not cfg.model.path:
        bad("model.path", cfg.model.path, "set it to a HF checkpoint directory or hub id")
    o = cfg.optimizer
    if o.schedule not in ("cosine", "linear", "constant"):
        bad("optimizer.schedule", o.schedule, "must be cosine, linear or constant")
    if not 0 <= o.warmup_ratio < 1:
        bad("optimizer.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    if not o.lr > 0:
        bad("optimizer.lr", o.lr, "must be > 0")
    targets = parse_list(cfg.model.lora_targets, name="config.model.lora_targets")
    if targets != ("all",) and any(t not in LORA_TARGETS_ALL for t in targets):
        bad("model.lora_targets", cfg.model.lora_targets, f"names must be in {LORA_TARGETS_ALL} (or 'all')")
    for p in parse_list(o.freeze_patterns, name="config.optimizer.freeze_patterns"):
        try:
            re.compile(p)
        except re.error as e:
            bad("optimizer.freeze_patterns", p, f"not a valid regex ({e})")


# Keys of config.model that are settings of the run (where the model is, what is trained), not fields of
# ModelConfig (the numerics and memory keys) or of LoRAConfig (the lora_* keys).
MODEL_SETTINGS = ("path", "make_tiny_if_missing", "tiny_hidden_size", "tiny_num_layers", "tokenizer", "finetune")


def lora_config(cfg) -> LoRAConfig | None:
    """``config.model.lora_*`` as a :class:`LoRAConfig`, field for field (``lora_rank`` -> ``rank``, ...; every
    field must be there), or None when ``config.model.finetune`` is not "lora"."""
    if cfg.model.finetune != "lora":
        return None
    return from_mapping(LoRAConfig, cfg.model, "model", prefix="lora_", complete=True)


def model_overrides(cfg) -> dict[str, Any]:
    """The :class:`ModelConfig` fields ``config.model`` sets (param_dtype, dtype, remat, attention_impl,
    attention_block, scan_layers) and ``lora`` (:func:`lora_config`): the overrides of the checkpoint's
    ``config.json`` for ``load_model`` / ``ModelConfig.from_hf``. Any other key of ``config.model`` that is
    not in :data:`MODEL_SETTINGS` must be a ModelConfig field (an unknown one fails, naming it)."""
    lora_keys = tuple(k for k in cfg.model.keys() if k.startswith("lora_"))
    return {**section_fields(ModelConfig, cfg.model, "model", exclude=MODEL_SETTINGS + lora_keys),
            "lora": lora_config(cfg)}


def resolve_model_dir(cfg) -> str:
    """``cfg.model.path``; creates the tiny random Qwen2 there first when asked (demo configs)."""
    m = cfg.model
    if not os.path.isdir(m.path) and m.make_tiny_if_missing:
        if jax.process_index() == 0:
            log.info("creating a tiny random Qwen2 model at %s", m.path)
            make_tiny_model(m.path, hidden_size=m.tiny_hidden_size, num_layers=m.tiny_num_layers,
                            intermediate_size=2 * m.tiny_hidden_size)
    return m.path


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
    patterns = [re.compile(p) for p in parse_list(opt.freeze_patterns, name="config.optimizer.freeze_patterns")]
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


def make_apply_step(tx, frozen: frozenset = frozenset()):
    """Jitted optimizer step over accumulated gradients (donated): divide by ``n_micro`` (the number of
    micro-batches, or the window's token count for token-mean SFT), clip + AdamW (``tx``), and refuse a
    non-finite update (state left untouched, ``finite=False`` reported). The reported ``grad_norm`` is
    the one clipping sees: over the updated leaves only (``frozen`` paths excluded)."""

    def apply_step(trainable, opt_state, grads_acc, n_micro):
        grads = jax.tree_util.tree_map(lambda g: g / n_micro, grads_acc)
        gnorm = optax.tree.norm({k: v for k, v in grads.items() if k not in frozen})
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_params = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(gnorm) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new_params)]))
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, grads_acc)
        return keep(new_params, trainable), keep(new_opt, opt_state), zeros, {"grad_norm": gnorm, "finite": finite}

    return jax.jit(apply_step, donate_argnums=(0, 1, 2))


# ----------------------------------------------------------------------------- model state
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
            salt = sha256_int(path_str(path), 3)
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


# ----------------------------------------------------------------------------- preemption, metrics, plots
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


# ----------------------------------------------------------------------------- exports
def export_model(cfg, model, model_dir: str, workdir: str) -> dict:
    """The PEFT adapter (LoRA runs) and/or the merged HF checkpoint under ``workdir/export``, as
    configured in ``cfg.export``. Every process must call it (the weights are gathered across hosts);
    process 0 writes. Returns ``{"adapter": dir, "merged": dir}`` (those written)."""
    exports = {}
    if cfg.model.finetune == "lora" and cfg.export.peft:
        base = os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir
        out = os.path.join(workdir, "export", "adapter")
        with paths.local_dir_for(out) as local:
            export_peft(model, local, base_model_name_or_path=base)
        exports["adapter"] = out
    if cfg.export.merged:
        out = os.path.join(workdir, "export", "merged")
        with paths.local_dir_for(out) as local:
            export_merged(model, local, dtype=cfg.export.dtype)
            if jax.process_index() == 0:
                copy_tokenizer(cfg.model.tokenizer or model_dir, local)
        exports["merged"] = out
    return exports


# ----------------------------------------------------------------------------- the skeleton
class TrainLoop:
    """Setup, the loop and the end of a training run; a subclass supplies its data and its step.

    What a subclass implements (in the order :meth:`setup` calls them):

    - :meth:`setup_data`: read its data (``self.tokenizer`` and ``self.model_dir`` are set);
    - :meth:`plan`: ``(loop steps, optimizer steps)`` (the schedule spans the optimizer steps);
    - :meth:`build_steps`: its jitted functions, a dict holding ``apply_step`` (see
      :func:`make_apply_step`); every other one takes ``parts.state()`` as first argument
      (:meth:`bound` binds it);
    - :meth:`setup_extra`: anything else (sampler, reference tables, ...);
    - :meth:`train_step`: one turn of the loop, returning its metrics (``None``: the data ran out);
    - :meth:`checkpoint_meta` / :meth:`restore_meta`: its position in the data, for exact resumes.

    Hooks with defaults: :meth:`begin` / :meth:`after_step` / :meth:`end` (evaluation), :meth:`log_line`,
    :meth:`postfix` (progress bar), :meth:`summarize`, :meth:`plot`, :meth:`report`, :meth:`close`.

    Attributes after :meth:`setup`: ``model_dir``, ``tokenizer``, ``model_cfg``, ``parts``, ``trainable``,
    ``tx``, ``schedule``, ``opt_state``, ``step_fns``, ``apply_step``, ``ckpt``, ``total_steps`` (turns
    of the loop) and ``opt_steps``.
    """

    unit = "step"  # one turn of the loop, in log lines and messages
    log_name = "iopo_jax.train"
    plot_file = "training_curves.png"

    def __init__(self, cfg, workdir: str, devices=None, progress: bool = True):
        self.cfg = cfg
        self.workdir = str(paths.makedirs(workdir))  # local: absolute; gs://...: kept (see iopo_jax.paths)
        self.progress = progress
        self.mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
        self.log = logging.getLogger(self.log_name)
        self.last_saved = 0

    # -- implemented by a subclass
    def setup_data(self) -> None:
        raise NotImplementedError

    def plan(self) -> tuple[int, int]:
        raise NotImplementedError

    def build_steps(self) -> dict:
        raise NotImplementedError

    def setup_extra(self) -> None:
        pass

    def train_step(self, step: int) -> dict | None:
        raise NotImplementedError

    def checkpoint_meta(self, step: int) -> dict:
        raise NotImplementedError

    def restore_meta(self, meta: dict) -> None:
        """Check that the checkpoint's ``meta`` fits this run (raise ``ValueError`` otherwise) and restore
        the data position from it."""
        raise NotImplementedError

    # -- hooks
    def begin(self, start: int, logger: MetricsLogger) -> None:
        """Before the first step (``start``: the step resumed from, 0 for a fresh run)."""

    def after_step(self, step: int, logger: MetricsLogger) -> None:
        """After step ``step`` (1-based) was logged, before its checkpoint."""

    def end(self, step: int, logger: MetricsLogger) -> None:
        """After the last step and its checkpoint (not when preempted)."""

    def log_line(self, step: int, metrics: dict) -> None:
        """Called with every metrics record written to metrics.jsonl."""

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.4g}"}

    def summarize(self, step: int) -> dict:
        return {}

    def plot(self, path: str) -> str | None:
        return None

    def report(self, summary: dict) -> None:
        """Process 0, at the end of a finished run."""

    def close(self) -> None:
        """At the end of :meth:`run`, finished, preempted or failed."""

    # -- setup
    def setup(self):
        """Model, data, optimizer, compiled steps and checkpointer; returns ``self``."""
        cfg = self.cfg
        self.model_dir = resolve_model_dir(cfg)  # creates the tiny demo model when asked
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or self.model_dir)
        self.setup_data()
        trainable = self.load_policy()
        self.total_steps, self.opt_steps = self.plan()
        self.schedule = make_schedule(cfg.optimizer, self.opt_steps)
        self.tx = make_optimizer(cfg.optimizer, self.opt_steps, trainable)
        with use_mesh(self.mesh):
            self.opt_state = jax.jit(self.tx.init)(trainable)
        self.trainable = trainable
        self.step_fns = self.build_steps()
        self.apply_step = self.step_fns["apply_step"]
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
        self.setup_extra()
        return self

    def load_policy(self) -> dict:
        """Load ``model_dir`` on the mesh (with LoRA when configured); sets ``parts``, returns the trainable
        leaves."""
        overrides = model_overrides(self.cfg)
        with use_mesh(self.mesh):
            model, self.model_cfg = load_model(self.model_dir, mesh=self.mesh, seed=self.cfg.train.seed, **overrides)
        self.parts, trainable = split_model(model, lora=overrides["lora"] is not None)
        return trainable

    def bound(self, name: str) -> BoundStep:
        """The jitted step ``name`` called without its model-state argument."""
        return BoundStep(self.step_fns[name], self.parts.state)

    # -- checkpoints
    def _arrays(self):
        return {"params": self.trainable, "opt_state": self.opt_state}

    def save(self, step: int):
        self.ckpt.save(step, self._arrays(), {"step": step, **self.checkpoint_meta(step)})
        self.last_saved = step

    def try_restore(self) -> int:
        """Restore the latest checkpoint, if any; returns the step to continue from."""
        arrays, meta = self.ckpt.restore(self._arrays())
        if arrays is None:
            return 0
        self.restore_meta(meta)
        self.trainable, self.opt_state = arrays["params"], arrays["opt_state"]
        self.log.info("resumed from %s %d (%s)", self.unit, meta["step"], self.ckpt.directory)
        return int(meta["step"])

    # -- divergence
    def check_update(self, step: int, info: dict, loss: float) -> None:
        """Raise :class:`TrainingDiverged` when the apply step refused the update of step ``step`` (0-based)
        or the loss is not finite."""
        if not bool(info["finite"]) or not math.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite loss or gradient at {self.unit} {step + 1} (loss={loss}, grad_norm="
                f"{float(info['grad_norm'])}); the update was not applied and the last good checkpoint "
                f"({self.unit} {self.last_saved}) in {self.ckpt.directory} is intact. Lower optimizer.lr, "
                "check the data, or use param_dtype=float32.")

    # -- the loop
    def run(self) -> dict:
        """Train to the end (resuming from the workdir's checkpoint) and finish: the summary dict, or
        ``{"steps", "preempted": True, "checkpoint"}`` when a SIGTERM stopped the run."""
        if not hasattr(self, "trainable"):
            self.setup()
        from tqdm.auto import tqdm

        cfg = self.cfg
        logger = MetricsLogger(self.workdir, tensorboard=cfg.train.tensorboard)
        start = self.try_restore()
        self.last_saved = step = start
        preempted = False
        self.begin(start, logger)
        bar = tqdm(total=self.total_steps, initial=start, desc=cfg.objective.name, dynamic_ncols=True,
                   disable=not self.progress or jax.process_index() != 0)
        guard = PreemptionGuard().__enter__()
        try:
            while step < self.total_steps:
                metrics = self.train_step(step)
                if metrics is None:  # the data ran out
                    break
                step += 1
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    logger.write(step, "train", metrics)
                    self.log_line(step, metrics)
                bar.set_postfix(self.postfix(metrics))
                bar.update(1)
                self.after_step(step, logger)
                if step % cfg.checkpoint.every == 0 and step < self.total_steps:
                    self.save(step)
                if step < self.total_steps and guard.should_stop():
                    preempted = True
                    break
            bar.close()
            if step > self.last_saved:
                self.save(step)
            self.ckpt.wait()
            if not preempted:
                self.end(step, logger)
        finally:
            guard.__exit__()
            bar.close()
            self.ckpt.wait()
            logger.close()
            self.close()
        if preempted:
            self.log.warning("preempted: checkpoint of %s %d saved in %s; rerun the same command to resume",
                             self.unit, step, self.ckpt.directory)
            return {"steps": step, "preempted": True, "checkpoint": self.ckpt.directory}
        return self.finish(step)

    def finish(self, step: int) -> dict:
        """Exports (every process), then on process 0 the plot, ``summary.json`` and :meth:`report`."""
        cfg = self.cfg
        summary = self.summarize(step)
        summary["steps"] = step
        # every process takes part in the export (the weights are gathered across hosts); process 0 writes
        summary["exports"] = export_model(cfg, self.parts.merge(self.trainable), self.model_dir, self.workdir)
        if jax.process_index() == 0:
            if cfg.train.plot:
                plot = self.plot(os.path.join(self.workdir, self.plot_file))
                if plot:
                    summary["plot"] = plot
            paths.write_text(os.path.join(self.workdir, "summary.json"), json.dumps(summary, indent=2, default=str))
            self.report(summary)
        return summary
