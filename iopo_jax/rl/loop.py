"""The online RL loop (SegPO, GRPO): rollouts -> rewards -> advantages -> clipped policy updates.

    python -m iopo_jax.train --config=configs/segpo_demo.py --workdir=/tmp/segpo_demo   # tiny, CPU, minutes
    python -m iopo_jax.train --config=configs/segpo_tpu_v4.py --workdir=gs://BUCKET/segpo \
        --config.rl.prompts_files=/data/eifbench_train.json --config.rl.judge.base_url=https://...

Every field is documented in configs/rl_base.py. One iteration (``train.max_steps`` counts them):

1. **rollout**: ``rl.prompts_per_step`` prompts (a seeded permutation per pass over the prompt set) x
   ``rl.group_size`` samples from the current policy (base + LoRA, no merge) with the JAX sampler;
2. **reward**: segmentation of every answer by its ``SUB_INSTRUCTION_k`` headings, verdicts from the reward
   model, then ``r_o`` / ``r_phi`` / ILA / CLA / all-pass / format (:mod:`iopo_jax.rl.rewards`);
3. **reference**: teacher-forced log-probs of the answers under the policy (the *old* log-probs of the
   ratio; the sampler's are not used) and under the reference (LoRA B zeroed = the base model);
4. **learner**: advantages (GRPO: group-normalised ``A_o`` on every answer token; SegPO: ``A_o + A_phi``,
   see :mod:`iopo_jax.rl.advantages`), then ``rl.ppo_epochs`` x ``rl.mini_batches`` optimizer steps of the
   clipped surrogate with the k3 KL penalty (token mean by default), gradients accumulated over
   micro-batches, LoRA-only AdamW (the trainer's optimizer and apply step), non-finite updates refused.

Checkpoints (orbax) hold the trainable weights, the optimizer state, the iteration, the prompt order
position and the seeds; a rerun with the same ``--workdir`` resumes and ends with exactly the weights of
an uninterrupted run (sampling keys are a function of ``(train.seed, iteration)``; judge replies come from
the cache). Written to the workdir: ``metrics.jsonl`` (one line per iteration), TensorBoard events,
``checkpoints/``, ``judge_cache.jsonl`` (judge rewards), ``rl_curves.png``, ``summary.json``, exports.

Multi-host: every process runs the same iteration on the same data (sampling and learning are sharded
over the mesh); judge calls are made by process 0 only and their verdicts broadcast.
"""
from __future__ import annotations

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.schema import from_mapping, parse_list
from data_pipeline.templates import get_template
from iopo_jax import paths
from iopo_jax.io_utils import read_jsonl
from iopo_jax.rl.advantages import RewardWeights, grpo_token_advantages, segpo_advantages
from iopo_jax.rl.policy_loss import clipped_policy_loss, k3_kl
from iopo_jax.rl.rewards import compute_rewards, load_prompts, make_reward, reward_metrics
from iopo_jax.rl.rollouts import (bucket_length, encode_prompts, iteration_seed, pack_rollouts, policy_token_logps,
                                  sample_groups, scatter_response, segment_rollouts)
from iopo_jax.sampling import SamplingParams
from iopo_jax.sampling.sampler import Sampler, read_eos_ids
from iopo_jax.sharding import batch_sharding, host_value, put_global, use_mesh
from iopo_jax.train_loop import (BoundStep, StepSpec, TrainingDiverged, TrainLoop, abstract_like,
                                 check_common_config, config_error, frozen_keys, make_apply_step,
                                 reference_trainable)

log = logging.getLogger("iopo_jax.rl")

OBJECTIVES = ("segpo", "grpo")


# ------------------------------------------------------------------------------------------------ config
def check_rl_config(cfg) -> None:
    """Fail early, naming the field, on values an RL run cannot use."""
    def bad(field, value, why):
        raise config_error(field, value, why)

    if "rl" not in cfg:
        raise ValueError("the config has no 'rl' section: start RL configs from configs/rl_base.py")
    r = cfg.rl
    if cfg.objective.name not in OBJECTIVES:
        bad("objective.name", cfg.objective.name, f"RL objectives are {OBJECTIVES}")
    check_common_config(cfg)
    if cfg.model.finetune == "lora" and cfg.model.lora_dropout > 0:
        bad("model.lora_dropout", cfg.model.lora_dropout, "must be 0 for RL (the ratio needs a deterministic policy)")
    if not parse_list(r.prompts_files):
        bad("rl.prompts_files", r.prompts_files, "give the RL prompt files (demo_eval JSONL or EIFBench JSON)")
    choices = {"prompts_kind": ("auto", "demo_eval", "eifbench"), "long_prompts": ("error", "skip"),
               "reward": ("rules", "judge", "python"), "format_reward": ("headings", "none"),
               "aggregation": ("token_mean", "seq_mean")}
    for f, allowed in choices.items():
        if r[f] not in allowed:
            bad(f"rl.{f}", r[f], f"must be one of {allowed}")
    if r.judge.on_error not in ("skip", "zero", "fail"):
        bad("rl.judge.on_error", r.judge.on_error, "must be skip, zero or fail")
    for f, lo in (("prompts_per_step", 1), ("group_size", 2), ("max_prompt_tokens", 1), ("max_response_tokens", 1),
                  ("sampler_batch_size", 1), ("ppo_epochs", 1), ("mini_batches", 1), ("micro_batch_size", 0),
                  ("top_k", 0), ("length_step", 0), ("adv_ddof", 0)):
        if int(r[f]) < lo:
            bad(f"rl.{f}", r[f], f"must be >= {lo}")
    if not r.temperature > 0:
        bad("rl.temperature", r.temperature, "must be > 0")
    if not 0 < r.top_p <= 1:
        bad("rl.top_p", r.top_p, "must be in (0, 1]")
    if not (0 <= r.eps_low < 1 and r.eps_high >= 0):
        bad("rl.eps_low/eps_high", (r.eps_low, r.eps_high), "need 0 <= eps_low < 1 and eps_high >= 0")
    if r.kl_coef < 0:
        bad("rl.kl_coef", r.kl_coef, "must be >= 0")
    rows = r.prompts_per_step * r.group_size
    if rows % r.mini_batches:
        bad("rl.mini_batches", r.mini_batches, f"must divide prompts_per_step * group_size = {rows}")
    mb = rows // r.mini_batches
    if r.micro_batch_size and mb % r.micro_batch_size:
        bad("rl.micro_batch_size", r.micro_batch_size, f"must divide the mini-batch of {mb} rows")


def weights_of(r) -> RewardWeights:
    return from_mapping(RewardWeights, r.weights, "rl.weights", complete=True)


# ------------------------------------------------------------------------------------------------ prompt order
class PromptOrder:
    """Prompts in a seeded permutation per pass; ``take(k)`` crosses passes. State: ``{"epoch", "pos"}``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _perm(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = self._perm()
            m = min(k - len(out), self.n - self.pos)
            out += [int(i) for i in perm[self.pos:self.pos + m]]
            self.pos += m
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def set_state(self, s: dict):
        if s.get("n") != self.n:
            raise ValueError(f"the checkpoint was made with {s.get('n')} prompts, this config has {self.n}; "
                             "use a fresh --workdir")
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


# ------------------------------------------------------------------------------------------------ jitted steps
def make_rl_steps(parts, tx, **kw):
    """``(logps, ref_logps, grad_step, apply_step)``: :func:`make_rl_step_fns` with the model state bound
    (passed as an argument at every call, never closed over by the compiled functions).

    ``logps(trainable, batch) -> [B, T]`` teacher-forced policy log-probs (``ref_logps``: LoRA off);
    ``grad_step(trainable, acc, mb, normalizer) -> (acc + grads, metrics)`` (acc donated);
    ``apply_step`` is the trainer's (clip, AdamW, masked updates, non-finite updates refused).
    """
    fns = make_rl_step_fns(parts, tx, **kw)
    bind = lambda f: BoundStep(f, parts.state)
    return bind(fns["logps"]), bind(fns["ref_logps"]), bind(fns["grad_step"]), fns["apply_step"]


def rl_step_settings(cfg) -> dict:
    """The settings of :func:`make_rl_step_fns` a config gives (``rl`` and ``train`` sections), but ``frozen``."""
    r = cfg.rl
    return dict(temperature=r.temperature, chunk=cfg.train.logprob_chunk, max_label_tokens=r.max_response_tokens,
                eps_low=r.eps_low, eps_high=r.eps_high, kl_coef=r.kl_coef, aggregation=r.aggregation,
                seed=cfg.train.seed, remat=cfg.train.get("logprob_remat", True))


def make_rl_step_fns(parts, tx, *, temperature: float, chunk: int, max_label_tokens: int, eps_low: float,
                     eps_high: float, kl_coef: float, aggregation: str, seed: int, remat: bool = True,
                     frozen: frozenset = frozenset()) -> dict:
    """The jitted RL functions, each taking the model state (``parts.state()``) as first argument:
    ``logps(state, trainable, batch)``, ``ref_logps(state, trainable, batch)``,
    ``grad_step(state, trainable, acc, mb, normalizer)`` (acc donated) and the trainer's ``apply_step``."""
    kw = dict(temperature=temperature, chunk=chunk, max_label_tokens=max_label_tokens, remat=remat)

    def logps(state, trainable, batch):
        return policy_token_logps(parts.merge(trainable, state=state), batch, **kw)[0]

    def ref_logps(state, trainable, batch):
        return logps(state, reference_trainable(parts, trainable, state), batch)

    def loss_fn(trainable, state, mb, normalizer):
        logp = logps(state, trainable, mb)
        mask = mb["mask"]
        loss, m = clipped_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, mb["ref_logp"], eps_low=eps_low,
                                      eps_high=eps_high, kl_coef=kl_coef, aggregation=aggregation,
                                      normalizer=normalizer)
        m = dict(m)
        kl = jnp.where(mask, k3_kl(jax.lax.stop_gradient(logp), mb["ref_logp"]), 0.0)
        m["kl"] = jnp.sum(kl) / jnp.maximum(jnp.sum(mask), 1)
        m["logp_mean"] = jnp.sum(jnp.where(mask, jax.lax.stop_gradient(logp), 0.0)) / jnp.maximum(jnp.sum(mask), 1)
        return loss, m

    def grad_step(state, trainable, acc, mb, normalizer):
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, state, mb, normalizer)
        return jax.tree_util.tree_map(jnp.add, acc, g), m

    # The trainer's apply step: clipping, AdamW, freeze masks, refusal of non-finite updates.
    return {"logps": jax.jit(logps), "ref_logps": jax.jit(ref_logps),
            "grad_step": jax.jit(grad_step, donate_argnums=(2,)), "apply_step": make_apply_step(tx, frozen)}


def rl_step_specs(fns: dict, parts, trainable: dict, opt_state, mesh, rows: int, seq_len: int) -> dict:
    """:class:`~iopo_jax.trainer.StepSpec` of the RL learner functions (``logps``, ``ref_logps``,
    ``grad_step``, ``apply_step``) for micro-batches of ``rows`` packed rollouts of ``seq_len`` tokens."""
    from jax.sharding import NamedSharding, PartitionSpec

    state, tr, opt = abstract_like(parts.state()), abstract_like(trainable), abstract_like(opt_state)
    rep = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, len(shape), shape)
                                                 if mesh is not None and shape else rep)
    batch = {k: sds((rows, seq_len), jnp.int32) for k in ("input_ids", "labels", "positions", "segment_ids")}
    mb = dict(batch, mask=sds((rows, seq_len), jnp.bool_), old_logp=sds((rows, seq_len), jnp.float32),
              ref_logp=sds((rows, seq_len), jnp.float32), advantages=sds((rows, seq_len), jnp.float32))
    return {"logps": StepSpec("logps", fns["logps"], (state, tr, batch)),
            "ref_logps": StepSpec("ref_logps", fns["ref_logps"], (state, tr, batch)),
            "grad_step": StepSpec("grad_step", fns["grad_step"], (state, tr, tr, mb, sds((), jnp.float32))),
            "apply_step": StepSpec("apply_step", fns["apply_step"], (tr, opt, tr, sds((), jnp.float32)))}


# ------------------------------------------------------------------------------------------------ the trainer
class RLTrainer(TrainLoop):
    """Online RL on :class:`~iopo_jax.train_loop.TrainLoop`: one turn of the loop is one iteration
    (rollouts, rewards, reference log-probs, learner updates). ``devices``: restrict the mesh (tests)."""

    unit = "iteration"
    log_name = "iopo_jax.rl"
    plot_file = "rl_curves.png"

    def __init__(self, cfg, workdir: str, devices=None, progress: bool = True):
        check_rl_config(cfg)
        super().__init__(cfg, workdir, devices, progress)
        self.rl = cfg.rl
        self.segpo = cfg.objective.name == "segpo"
        self.reward = None

    # -- setup (see TrainLoop.setup)
    def setup_data(self):
        self.prompts, self.prompt_ids = self._load_prompts()
        self.num_slots = max(1, max(len(p.slots) for p in self.prompts))
        self.num_constraints = max(1, max(p.num_constraints for p in self.prompts))

    def plan(self) -> tuple[int, int]:
        cfg, r = self.cfg, self.rl
        self.iterations = (cfg.train.max_steps if cfg.train.max_steps > 0 else
                           max(1, math.ceil(len(self.prompts) * (cfg.data.num_epochs or 1) / r.prompts_per_step)))
        return self.iterations, self.iterations * r.ppo_epochs * r.mini_batches

    def build_steps(self) -> dict:
        return make_rl_step_fns(self.parts, self.tx, **rl_step_settings(self.cfg),
                                frozen=frozen_keys(self.cfg.optimizer, self.trainable))

    def setup_extra(self):
        cfg, r, model_dir = self.cfg, self.rl, self.model_dir
        self.logp_fn, self.ref_fn, self.grad_step = map(self.bound, ("logps", "ref_logps", "grad_step"))
        eos = list(read_eos_ids(model_dir)) if os.path.isdir(model_dir) else []
        stop_tok = self.tokenizer.convert_tokens_to_ids(get_template(cfg.data.template).stop_token)
        for t in (self.tokenizer.eos_token_id, stop_tok):
            if isinstance(t, int) and t >= 0 and t not in eos:
                eos.append(t)
        buckets = list(parse_list(r.prompt_buckets, int, name="config.rl.prompt_buckets")) or None
        if buckets and max(buckets) < r.max_prompt_tokens:
            buckets.append(r.max_prompt_tokens)
        self.sampler = Sampler(self.parts.merge(self.trainable), self.tokenizer, mesh=self.mesh,
                               max_batch_size=r.sampler_batch_size,
                               max_model_len=r.max_prompt_tokens + r.max_response_tokens, prompt_buckets=buckets,
                               new_token_buckets=(r.max_response_tokens,), eos_token_ids=eos)
        self.sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       max_new_tokens=r.max_response_tokens,
                                       logprobs=bool(r.check_sampler_logprobs and r.temperature == 1.0))
        self.order = PromptOrder(len(self.prompts), cfg.data.seed)
        self.reward = make_reward(r, self.prompts, self.workdir) if self._rewards_here() else None
        log.info("%s: %d prompts, %d iterations of %d x %d rollouts, %d optimizer steps", cfg.objective.name,
                 len(self.prompts), self.iterations, r.prompts_per_step, r.group_size, self.opt_steps)

    def _rewards_here(self) -> bool:
        return jax.process_index() == 0 or self.rl.reward != "judge"

    def _load_prompts(self):
        r, cfg = self.rl, self.cfg
        template, name = None, None
        kw = {}
        if r.answer_template:
            with open(r.answer_template, encoding="utf-8") as f:
                template, name = f.read(), r.answer_template
            kw = dict(answer_template=template, answer_template_name=name)
        prompts = load_prompts(parse_list(r.prompts_files), r.prompts_kind, categories=parse_list(r.categories), **kw)
        ids = encode_prompts(self.tokenizer, [p.user for p in prompts], cfg.data.template, cfg.data.system)
        keep_p, keep_i, skipped = [], [], 0
        for p, x in zip(prompts, ids):
            if len(x) > r.max_prompt_tokens:
                if r.long_prompts == "error":
                    raise ValueError(f"{p.id}: the chat prompt has {len(x)} tokens > rl.max_prompt_tokens="
                                     f"{r.max_prompt_tokens}; raise it or set rl.long_prompts='skip'")
                skipped += 1
                continue
            keep_p.append(p)
            keep_i.append(x)
        if skipped:
            log.warning("skipped %d prompts longer than rl.max_prompt_tokens=%d", skipped, r.max_prompt_tokens)
        if not keep_p:
            raise ValueError("no prompt fits rl.max_prompt_tokens")
        if len(keep_p) < r.prompts_per_step:
            log.warning("only %d prompts for rl.prompts_per_step=%d: prompts repeat within an iteration",
                        len(keep_p), r.prompts_per_step)
        return keep_p, keep_i

    def _micro_rows(self) -> int:
        r = self.rl
        mb = r.prompts_per_step * r.group_size // r.mini_batches
        return r.micro_batch_size or mb

    def _forward_all(self, fn, packed: dict) -> np.ndarray:
        """Run a log-prob function over all rows in micro-batches; [N, L] on the host."""
        keys = ("input_ids", "labels", "positions", "segment_ids")
        n, mu = packed["input_ids"].shape[0], self._micro_rows()
        outs = []
        with use_mesh(self.mesh):
            for s in range(0, n, mu):
                outs.append(host_value(fn(self.trainable, {k: put_global(packed[k][s:s + mu], self.mesh) for k in keys})))
        return np.concatenate(outs, axis=0)

    # -- rewards (judge on process 0, broadcast)
    def _score(self, rollout_prompts, texts, format_ok) -> tuple[dict, dict]:
        r = self.rl
        stats = {}
        if self.reward is not None:
            verdicts = self.reward.score(rollout_prompts, texts)
            rew = compute_rewards(rollout_prompts, verdicts, format_ok, num_slots=self.num_slots,
                                  num_constraints=self.num_constraints, weights=weights_of(r),
                                  format_mode=r.format_reward)
            stats = self.reward.stats()
        else:
            rew = None
        if jax.process_count() > 1 and r.reward == "judge":
            from jax.experimental import multihost_utils

            n = len(texts)
            shapes = {"r_o": (n,), "ila": (n,), "cla": (n,), "all_pass": (n,), "format": (n,),
                      "r_phi": (n, self.num_slots), "slot_mask": (n, self.num_slots),
                      "segment_slot": (n, self.num_slots), "valid": (n,)}
            dtypes = {"slot_mask": bool, "segment_slot": bool, "valid": bool}
            if rew is None:
                rew = {k: np.zeros(s, dtypes.get(k, np.float32)) for k, s in shapes.items()}
            rew = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(
                {k: rew[k] for k in shapes}).items()}
        return rew, stats

    # -- one iteration
    def iteration(self, step: int) -> dict:
        """Run RL iteration ``step`` (0-based): returns its metrics."""
        r = self.rl
        P, G = r.prompts_per_step, r.group_size
        t0 = time.perf_counter()
        idx = self.order.take(P)
        prompts = [self.prompts[i] for i in idx]
        pids = [self.prompt_ids[i] for i in idx]
        self.sampler.update_model(self.parts.merge(self.trainable))
        comps = sample_groups(self.sampler, pids, G, self.sampling, iteration_seed(self.cfg.train.seed, step))
        t1 = time.perf_counter()

        rprompts = [prompts[c.index] for c in comps]
        resp = [list(c.token_ids) for c in comps]
        seg = segment_rollouts(self.tokenizer, resp, [p.expected_ids for p in rprompts], self.num_slots)
        rew, judge_stats = self._score(rprompts, seg.texts, seg.format_ok)
        t2 = time.perf_counter()

        prompt_rows = [pids[c.index] for c in comps]
        length = bucket_length(max(len(a) + len(b) for a, b in zip(prompt_rows, resp)), r.length_step,
                               r.max_prompt_tokens + r.max_response_tokens)
        packed = pack_rollouts(prompt_rows, resp, length, pad_id=self.sampler.pad_id)
        old = self._forward_all(self.logp_fn, packed)
        ref = self._forward_all(self.ref_fn, packed)
        t3 = time.perf_counter()

        valid = rew["valid"]
        mask = packed["response_mask"] & valid[:, None]
        adv = self._advantages(rew, seg, packed, mask, P, G)
        metrics = self._learn(packed, mask, old, ref, adv, step)
        t4 = time.perf_counter()

        lens = np.array([len(x) for x in resp], np.float64)
        metrics.update(reward_metrics(rew))
        metrics.update(judge_stats)
        ro = rew["r_o"].reshape(P, G)
        metrics.update({
            "rollout/response_len": float(lens.mean()), "rollout/response_len_max": float(lens.max()),
            "rollout/truncated": float(np.mean([c.finish_reason == "length" for c in comps])),
            "rollout/zero_std_groups": float(np.mean(ro.max(1) == ro.min(1))),
            "rollout/segments_found": float(seg.found.sum(1).mean()),
            "advantage/abs_mean": float(np.abs(adv)[mask].mean()) if mask.any() else 0.0,
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/reference_s": t3 - t2,
            "time/learner_s": t4 - t3, "time/iteration_s": t4 - t0,
            "throughput/rollout_tokens_per_s": float(lens.sum() / max(t1 - t0, 1e-9)),
            "throughput/learner_tokens_per_s": float(mask.sum() * r.ppo_epochs / max(t4 - t3, 1e-9)),
        })
        if self.sampling.logprobs:
            lp = scatter_response([c.logprobs or [] for c in comps], packed["response_start"], length)
            d = np.abs(lp - old)[packed["response_mask"]]
            metrics["rollout/sampler_logp_maxdiff"] = float(d.max()) if d.size else 0.0
        return metrics

    def _advantages(self, rew, seg, packed, mask, P, G) -> np.ndarray:
        r = self.rl
        valid = rew["valid"].reshape(P, G)
        n, length = mask.shape
        if self.segpo:
            tok_seg = scatter_response(seg.token_segment, packed["response_start"], length, fill=-1, dtype=np.int32)
            seg_valid = seg.found & rew["segment_slot"] & rew["slot_mask"]
            out = segpo_advantages(rew["r_o"].reshape(P, G), rew["r_phi"].reshape(P, G, -1),
                                   seg_valid.reshape(P, G, -1), tok_seg.reshape(P, G, length),
                                   mask.reshape(P, G, length), valid=valid, eps=r.adv_eps, ddof=r.adv_ddof).token
        else:
            out = grpo_token_advantages(rew["r_o"].reshape(P, G), mask.reshape(P, G, length), valid=valid,
                                        eps=r.adv_eps, ddof=r.adv_ddof)
        return np.asarray(out, np.float32).reshape(n, length)

    def _learn(self, packed, mask, old, ref, adv, step) -> dict:
        r = self.rl
        n = mask.shape[0]
        mb_rows, mu = n // r.mini_batches, self._micro_rows()
        keys = ("input_ids", "labels", "positions", "segment_ids")
        per_token = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "approx_kl_old",
                     "advantage_mean", "kl", "logp_mean")
        sums: dict[str, float] = {}
        ratio_max, tokens, grad_norms, losses, pg_losses = 0.0, 0.0, [], [], []
        rng = np.random.default_rng([self.cfg.train.seed, step, 7])
        with use_mesh(self.mesh):
            for _ in range(r.ppo_epochs):
                perm = rng.permutation(n) if r.mini_batches > 1 else np.arange(n)
                for b in range(r.mini_batches):
                    rows = perm[b * mb_rows:(b + 1) * mb_rows]
                    m_rows = mask[rows]
                    norm = float(m_rows.sum()) if r.aggregation == "token_mean" else float(m_rows.any(1).sum())
                    acc = jax.tree_util.tree_map(jnp.zeros_like, self.trainable)
                    loss = pg = 0.0
                    for s in range(0, mb_rows, mu):
                        rr = rows[s:s + mu]
                        mb = {k: put_global(packed[k][rr], self.mesh) for k in keys}
                        mb.update(mask=put_global(mask[rr], self.mesh), old_logp=put_global(old[rr], self.mesh), ref_logp=put_global(ref[rr], self.mesh),
                                  advantages=put_global(adv[rr], self.mesh))
                        acc, m = self.grad_step(self.trainable, acc, mb, jnp.float32(max(norm, 1.0)))
                        m = {k: float(v) for k, v in jax.device_get(m).items()}
                        t = m["tokens"]
                        tokens += t
                        for k in per_token:
                            sums[k] = sums.get(k, 0.0) + m.get(k, 0.0) * t
                        ratio_max = max(ratio_max, m["ratio_max"])
                        loss += m["loss"]
                        pg += m["pg_loss"]
                    self.trainable, self.opt_state, _, info = self.apply_step(self.trainable, self.opt_state, acc,
                                                                              jnp.float32(1.0))
                    info = jax.device_get(info)
                    self.check_update(step, info, loss)
                    grad_norms.append(float(info["grad_norm"]))
                    losses.append(loss)
                    pg_losses.append(pg)
        out = {k: v / max(tokens, 1.0) for k, v in sums.items()}
        out.update(loss=float(np.mean(losses)), pg_loss=float(np.mean(pg_losses)), ratio_max=ratio_max,
                   grad_norm=float(np.mean(grad_norms)), tokens=tokens / max(r.ppo_epochs, 1))
        done = (step + 1) * r.ppo_epochs * r.mini_batches
        out["lr"] = float(self.schedule(done - 1))
        return out

    def step_specs(self, rows: int | None = None, seq_len: int | None = None) -> dict:
        """Every jitted learner function with abstract arguments shaped and sharded like this run's (after
        :meth:`setup`); ``rows`` defaults to the micro-batch, ``seq_len`` to the longest rollout. The
        sampler's compiled prefill/decode take the weights as arguments too (``self.sampler``)."""
        r = self.rl
        return rl_step_specs(self.step_fns, self.parts, self.trainable, self.opt_state, self.mesh,
                             rows or self._micro_rows(), seq_len or r.max_prompt_tokens + r.max_response_tokens)

    # -- checkpoints (the side-car; TrainLoop saves and restores the arrays)
    def checkpoint_meta(self, step: int) -> dict:
        return {"prompts": self.order.get_state(), "iterations": self.iterations, "seed": self.cfg.train.seed,
                "optimizer_steps": step * self.rl.ppo_epochs * self.rl.mini_batches}

    def restore_meta(self, meta: dict):
        if meta.get("iterations") != self.iterations or meta.get("seed") != self.cfg.train.seed:
            raise ValueError(f"the checkpoint in {self.ckpt.directory} was made for {meta.get('iterations')} "
                             f"iterations with seed {meta.get('seed')}, this config runs {self.iterations} with seed "
                             f"{self.cfg.train.seed}; use a fresh --workdir")
        self.order.set_state(meta["prompts"])

    # -- the loop (see TrainLoop.run)
    def train_step(self, step: int) -> dict:
        return self.iteration(step)

    def log_line(self, step: int, metrics: dict):
        log.info("iteration %d/%d: r_o %.3f  r_phi %.3f  kl %.4g  clip %.3f  len %.1f  (%.1f s)", step,
                 self.iterations, metrics.get("rollout/r_o", float("nan")),
                 metrics.get("rollout/r_phi", float("nan")), metrics["kl"], metrics["clip_fraction"],
                 metrics["rollout/response_len"], metrics["time/iteration_s"])

    def postfix(self, metrics: dict) -> dict:
        return {"r_o": f"{metrics.get('rollout/r_o', float('nan')):.3f}", "kl": f"{metrics['kl']:.3g}",
                "s/it": f"{metrics['time/iteration_s']:.1f}"}

    def close(self):
        if self.reward is not None:
            self.reward.close()

    # -- the end (see TrainLoop.finish): the history of every iteration, resumed ones included
    def summarize(self, step: int) -> dict:
        self._history = read_history(os.path.join(self.workdir, "metrics.jsonl"))
        summary = summarize_rl(self._history)
        summary["objective"] = self.cfg.objective.name
        return summary

    def plot(self, path: str) -> str | None:
        return plot_rl(self._history, path) if self._history else None

    def report(self, summary: dict):
        print(format_rl_summary(summary))


# ------------------------------------------------------------------------------------------------ reporting
def read_history(path: str) -> list[tuple[int, dict]]:
    """``[(iteration, metrics)]`` from metrics.jsonl, the last record of each iteration (resumed runs
    repeat the iterations after their last checkpoint)."""
    by_step = {}
    for rec in read_jsonl(path):
        if rec.get("split") == "train":
            by_step[int(rec["step"])] = {k: v for k, v in rec.items() if k not in ("step", "split", "time")}
    return sorted(by_step.items())


def _mean(hist, key, sl) -> float:
    xs = [m[key] for _, m in hist[sl] if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return float(np.mean(xs)) if xs else float("nan")


def summarize_rl(hist: list[tuple[int, dict]]) -> dict:
    """First-10 / last-10 iteration means of the rollout reward (and friends) for the end-of-run report."""
    out: dict = {"iterations_logged": len(hist)}
    if not hist:
        return out
    first, last = slice(0, 10), slice(max(0, len(hist) - 10), len(hist))
    out["rollout_reward_first10"] = _mean(hist, "rollout/r_o", first)
    out["rollout_reward_last10"] = _mean(hist, "rollout/r_o", last)
    for key in ("rollout/r_phi", "rollout/ila", "rollout/cla", "rollout/all_pass", "rollout/format",
                "rollout/response_len", "kl", "clip_fraction", "time/iteration_s"):
        out[f"{key}_first10"] = _mean(hist, key, first)
        out[f"{key}_last10"] = _mean(hist, key, last)
    out["train_first"] = hist[0][1]
    out["train_last"] = hist[-1][1]
    return out


def format_rl_summary(s: dict) -> str:
    lines = [f"{s.get('objective', 'rl')}: {s.get('steps')} iterations"]
    if "rollout_reward_first10" in s:
        lines.append(f"  mean rollout reward r_o: first 10 iterations {s['rollout_reward_first10']:.4f} -> "
                     f"last 10 iterations {s['rollout_reward_last10']:.4f}")
        for key in ("rollout/r_phi", "rollout/ila", "rollout/cla", "rollout/all_pass", "rollout/format",
                    "rollout/response_len", "kl"):
            a, b = s.get(f"{key}_first10"), s.get(f"{key}_last10")
            if a is not None and not (math.isnan(a) and math.isnan(b)):
                lines.append(f"  {key}: {a:.4g} -> {b:.4g}")
    return "\n".join(lines)


def plot_rl(hist: list[tuple[int, dict]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in hist]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("rollout/r_o", "rollout/cla", "rollout/ila", "rollout/r_phi"):
        ys = [m.get(key, float("nan")) for _, m in hist]
        if any(isinstance(y, (int, float)) and math.isfinite(y) for y in ys):
            axes[0].plot(steps, ys, label=key.split("/")[-1])
    axes[0].set_title("rollout rewards")
    axes[0].legend()
    axes[1].plot(steps, [m.get("kl", float("nan")) for _, m in hist], label="KL to reference")
    axes[1].plot(steps, [m.get("clip_fraction", float("nan")) for _, m in hist], label="clip fraction")
    axes[1].legend()
    axes[2].plot(steps, [m.get("rollout/response_len", float("nan")) for _, m in hist])
    axes[2].set_title("response length (tokens)")
    for a in axes:
        a.set_xlabel("iteration")
    fig.tight_layout()
    paths.write_png(path, fig)
    plt.close(fig)
    return path


__all__ = ["RLTrainer", "PromptOrder", "TrainingDiverged", "check_rl_config", "make_rl_steps", "make_rl_step_fns", "rl_step_specs", "read_history",
           "summarize_rl", "format_rl_summary"]
