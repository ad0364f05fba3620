"""One IOPO training step: our jitted JAX step vs transformers + peft (the LLaMA-Factory path), same run.

    python bench/train_step.py                                   # demo-sized model, two settings (~4 min on 2 busy cores)
    python bench/train_step.py --settings 100:30:4 --steps 10    # one setting, more timed steps
    python bench/train_step.py --hidden_size 512 --num_layers 8 --settings 512:128:1 --skip_torch
    python bench/train_step.py --peak_tflops 989 --torch_device cuda --dtype bfloat16 ...   # prints MFU too

The step. A batch of G groups of 4 sequences (x1 y1, x1 y2, x2 y2, x2 y1: IOPO's column order) with
random token ids: prompts of ~P tokens and responses of ~R tokens (each length drawn uniformly in
[0.8, 1.2] x the nominal one), right-padded to a multiple of 8, labels = token ids on the responses
and -100 on prompts and padding. Both sides load the same random Qwen2 checkpoint (made once with
the tiny-model maker, real 151,936-row vocabulary; default: the CPU demo's model, hidden 64, 2
layers) in float32 with LoRA r=8, alpha=16, dropout 0 on all linear layers
(q, k, v, o, gate, up, down), and run the same step:

  reference log-probs (LoRA off, no gradient) -> policy log-probs -> IOPO sigmoid loss
  -log sigmoid(beta (h11 + h22 - h12 - h21)), h = sum of response-token log-probs (policy - reference),
  mean over groups -> gradients of the LoRA factors -> global-norm clipping 1.0 -> AdamW update.

* ours: ``iopo_jax.trainer.make_steps`` (the trainer's jitted ``micro_step`` + ``apply_step``,
  ``objective=iopo``, reference ``online``, log-prob chunk ``--chunk``) on a mesh of all JAX devices;
* torch: ``transformers.AutoModelForCausalLM`` (Qwen2 or Llama, from the same checkpoint) + ``peft`` LoRA; reference under
  ``torch.no_grad()`` and ``model.disable_adapter()``; log-probs as LLaMA-Factory computes them (full
  float32 logits over every position, ``log_softmax``, ``gather`` of the labels, masked sum);
  ``torch.optim.AdamW`` with the same hyper-parameters.

Timing. Each side runs in its own worker process (so that each peak RSS is its own): it loads the
model and runs ``--warmup`` untimed steps (this includes JAX compilation; the two workers do this
at the same time), then the parent asks the two workers for one step at a time, alternating which
goes first, so both see the same machine load and never run at the same time.
Reported: median step time over ``--steps`` steps, the ratio ours / torch (target <= 0.5 on CPU),
the median CPU time (user + system, all threads) per step (steadier than wall time on a busy machine),
tokens/s (real, non-padding tokens of the 4G policy sequences per step), peak RSS of each worker
(``ru_maxrss``; "+" = above the RSS after imports, i.e. model, activations, compilation), model
FLOP/s (:func:`iopo_step_flops`) and, with ``--peak_tflops``, MFU. A parity line compares the policy
log-probs of the first step (before any update both sides compute the base model). Threads: XLA's CPU
client uses every core by default; torch gets ``torch.set_num_threads(--threads)`` (default: all cores).

By default both workers keep their model on the device at the same time (JAX's preallocation is turned
off for that); ``--one_side_at_a_time`` runs ours to the end and then torch, so that on a GPU each side has
the memory to itself (bench/gpu_suite.sh does this). Without ``--random_init`` the random model is made
through a checkpoint, so very large shapes need the disk and host memory of a float32 export of that size;
with it, each side initialises random weights on its device from a config.json only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100
PAD_ID = 151643  # <|endoftext|>
K = 4  # sequences per IOPO group


# ----------------------------------------------------------------------------- FLOPs / MFU
def iopo_step_flops(cfg: dict, seq_lens, resp_lens, *, lora_rank: int = 8, lora_targets=LORA_TARGETS) -> dict:
    """Model FLOPs of one IOPO step: policy forward + backward and reference forward over the batch.

    ``cfg``: HF config.json dict (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, vocab_size). ``seq_lens``: real (non-padding) length of every sequence
    of the batch; ``resp_lens``: its labelled (response) tokens. Terms (a multiply-add = 2 FLOPs):

    * body: ``N`` = weights of the decoder layers' linear layers (+ the LoRA factors); a forward costs
      ``2 N`` per token;
    * attention: causal scores and weighted sum, ``4 * layers * heads * head_dim * t (t + 1) / 2`` per
      forward of a sequence of ``t`` tokens (only the unmasked half of the square is counted);
    * LM head: ``2 * hidden * vocab`` per forward, on response tokens only (the only positions whose
      log-probs the loss needs; our code computes no other logits);
    * policy: forward + backward = 3 x forward (the usual 6N-per-token convention), reference: 1 x forward.

    Returns ``{"policy", "reference", "total"}`` (the 6N convention, what MFU is reported with) and
    ``"total_lora_exact"``: with LoRA the frozen weights need no weight gradients, so the backward of the
    body and head costs ~1 x forward (+ the LoRA weight gradients): what the step really has to compute.
    MFU = total / step seconds / peak FLOP/s of the device.
    """
    d = cfg["hidden_size"]
    f = cfg["intermediate_size"]
    layers = cfg["num_hidden_layers"]
    n = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or n
    hd = cfg.get("head_dim") or d // n
    v = cfg["vocab_size"]
    shapes = {"q_proj": (d, n * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (n * hd, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    n_base = layers * sum(i * o for i, o in shapes.values())
    n_lora = layers * sum(lora_rank * (i + o) for name, (i, o) in shapes.items() if name in lora_targets)
    tokens = float(sum(seq_lens))
    resp = float(sum(resp_lens))
    attn_fwd = sum(4.0 * layers * n * hd * t * (t + 1) / 2 for t in seq_lens)
    body_fwd = 2.0 * (n_base + n_lora) * tokens
    head_fwd = 2.0 * d * v * resp
    fwd = body_fwd + attn_fwd + head_fwd
    policy = 3.0 * fwd
    reference = fwd
    # LoRA-exact backward: activation gradients (~1x forward) + LoRA weight gradients (2 N_lora per token).
    policy_exact = 2.0 * fwd + 2.0 * n_lora * tokens + attn_fwd  # attention backward is 2x its forward
    return {"policy": policy, "reference": reference, "total": policy + reference,
            "total_lora_exact": policy_exact + reference, "tokens": tokens, "response_tokens": resp,
            "n_body_params": n_base, "n_lora_params": n_lora}


def mfu(total_flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (``peak_tflops`` x 1e12)."""
    return total_flops / seconds / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- the batch
def make_batch(groups: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> dict:
    """IOPO groups of random tokens, right-padded; numpy arrays shared by both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seqs = []
    draw_len = lambda m: int(rng.integers(max(1, round(0.8 * m)), max(1, round(1.2 * m)) + 1))
    pad_id = PAD_ID if vocab > PAD_ID else vocab - 1  # Qwen2's <|endoftext|>, or the last row of a smaller vocab
    hi = min(vocab, pad_id)  # tokens drawn below the pad id (and inside the vocabulary)
    for _ in range(groups):
        x1, x2 = (rng.integers(0, hi, draw_len(prompt_len)) for _ in range(2))
        y1, y2 = (rng.integers(0, hi, draw_len(response_len)) for _ in range(2))
        seqs += [(x1, y1), (x1, y2), (x2, y2), (x2, y1)]  # chosen_v1, rejected_v1, chosen_v2, rejected_v2
    t = max(len(x) + len(y) for x, y in seqs)
    t = -(-t // 8) * 8
    b = len(seqs)
    ids = np.full((b, t), pad_id, np.int32)
    labels = np.full((b, t), IGNORE_INDEX, np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r, (x, y) in enumerate(seqs):
        n = len(x) + len(y)
        ids[r, :n] = np.concatenate([x, y])
        labels[r, len(x):n] = y
        seg[r, :n] = 1
        pos[r, :n] = np.arange(n)
    out = {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos,
           "seq_lens": np.array([len(x) + len(y) for x, y in seqs]),
           "resp_lens": np.array([len(y) for _, y in seqs])}
    # The same groups with shared prompts (data.share_prompt): rows [x1 | y1 | y2] and [x2 | y2 | y1].
    sys.path.insert(0, REPO)
    from data_pipeline.batching import shared_prompt_rows

    rows = []
    for g in range(groups):
        (x1, y1), (_, y2) = seqs[4 * g], seqs[4 * g + 1]
        rows += [(x1, y1, y2), (seqs[4 * g + 2][0], y2, y1)]
    ts = -(-max(len(x) + len(a) + len(b) for x, a, b in rows) // 8) * 8
    for k, v in shared_prompt_rows(rows, ts, pad_id).items():
        out["sp_" + k] = v
    return out


# ----------------------------------------------------------------------------- workers
def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _send(kind: str, obj: dict) -> None:
    sys.stdout.write(f"{kind} {json.dumps(obj)}\n")
    sys.stdout.flush()


def _serve(step_fn, setup_info: dict, warmup: int, rss0: int) -> None:
    """Warm up, then run one timed step per 'step' line on stdin until 'quit'."""
    first = None
    t_first = None
    for i in range(warmup):
        t = time.perf_counter()
        out = step_fn()
        if i == 0:
            first, t_first = out, time.perf_counter() - t
    _send("READY", {**setup_info, "first_step_s": t_first, "first": first, "rss_after_imports": rss0})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t, c = time.perf_counter(), _cpu_seconds()
            out = step_fn()
            _send("STEP", {"seconds": time.perf_counter() - t, "cpu_seconds": _cpu_seconds() - c, "loss": out["loss"],
                           "load1": os.getloadavg()[0]})
        elif cmd == "quit":
            break
    _send("DONE", {"peak_rss": _maxrss(), "rss_after_imports": rss0})


def jax_worker(a, batch) -> None:
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.base import get_config
    from iopo_jax.models.config import LoRAConfig
    from iopo_jax.models.weights import load_model
    from iopo_jax.objectives import ObjectiveConfig, get_objective
    from iopo_jax.sharding import make_mesh, use_mesh
    from iopo_jax.trainer import device_batch, make_optimizer, make_steps, split_model

    rss0 = _rss()
    t0 = time.perf_counter()
    mesh = make_mesh({"fsdp": -1})
    lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=LORA_TARGETS)
    with use_mesh(mesh):
        if a.random_init:  # random weights made on the device (no checkpoint on disk)
            from flax import nnx

            from iopo_jax.models.config import ModelConfig
            from iopo_jax.models.transformer import Transformer

            mcfg = ModelConfig.from_hf(a.model_dir, param_dtype=a.param_dtype, dtype=a.dtype, remat=a.remat, lora=lora,
                                       attention_impl=a.attention_impl)
            model = Transformer(mcfg, rngs=nnx.Rngs(a.seed))
        else:
            model, _ = load_model(a.model_dir, mesh=mesh, seed=a.seed, param_dtype=a.param_dtype, dtype=a.dtype,
                                  remat=a.remat, lora=lora, attention_impl=a.attention_impl)
    parts, trainable = split_model(model, lora=True)
    opt = get_config().optimizer
    opt.lr, opt.warmup_ratio, opt.max_grad_norm = a.lr, 0.0, 1.0
    tx = make_optimizer(opt, 10_000, trainable)
    ocfg = ObjectiveConfig(beta=a.beta)
    micro_step, apply_step, _, _ = make_steps(parts, get_objective("iopo"), ocfg, K, a.chunk, tx, a.seed, dropout=False)
    with use_mesh(mesh):
        opt_state = jax.jit(tx.init)(trainable)
        if a.share_prompt:
            keys = ("input_ids", "segment_ids", "positions", "prefix_ids", "score_positions", "score_targets",
                    "score_sequence", "valid")
            dbatch = device_batch({k: batch["sp_" + k] for k in keys}, mesh)
        else:
            dbatch = device_batch({k: batch[k] for k in ("input_ids", "labels", "segment_ids", "positions")}, mesh)
    state = {"trainable": trainable, "opt": opt_state,
             "acc": jax.tree_util.tree_map(jnp.zeros_like, trainable), "step": 0}
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - t0
    cols = ("chosen_v1", "rejected_v1", "chosen_v2", "rejected_v2")

    def step():
        with use_mesh(mesh):
            acc, m = micro_step(state["trainable"], state["acc"], dbatch, jnp.int32(state["step"]))
            tr, op, acc, info = apply_step(state["trainable"], state["opt"], acc, jnp.float32(1.0))
            jax.block_until_ready((tr, op, acc, m, info))
        state.update(trainable=tr, opt=op, acc=acc, step=state["step"] + 1)
        m = jax.device_get(m)
        return {"loss": float(m["loss"]), "logps": [float(m[f"logps/{c}"]) for c in cols]}

    info = {"setup_s": setup_s, "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "n_lora": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable)))}
    _serve(step, info, a.warmup, rss0)


def torch_worker(a, batch) -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rss0 = _rss()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    device = a.torch_device
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    if a.random_init:  # random weights made on the device (no checkpoint on disk)
        from transformers import AutoConfig

        hcfg = AutoConfig.from_pretrained(a.model_dir)
        hcfg._attn_implementation = a.torch_attn
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hcfg).to(tdt)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=tdt, attn_implementation=a.torch_attn).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["segment_ids"] > 0, dtype=torch.long, device=device)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long, device=device)
    g = ids.shape[0] // K
    setup_s = time.perf_counter() - t0

    def seq_logps():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, T, V]
        tgt = labels[:, 1:].clone()
        keep = tgt != IGNORE_INDEX
        tgt[~keep] = 0
        per_tok = torch.gather(logits[:, :-1].log_softmax(-1), 2, tgt.unsqueeze(2)).squeeze(2)
        return (per_tok * keep).sum(-1)

    def step():
        with torch.no_grad(), model.disable_adapter():
            ref = seq_logps()
        pol = seq_logps()
        h = (pol - ref).view(g, K)
        loss = -F.logsigmoid(a.beta * (h[:, 0] + h[:, 2] - h[:, 1] - h[:, 3])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
        return {"loss": float(loss.detach()), "logps": pol.detach().float().view(g, K).mean(0).tolist()}

    info = {"setup_s": setup_s, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "n_lora": int(sum(p.numel() for p in params))}
    _serve(step, info, a.warmup, rss0)


class Worker:
    def __init__(self, side: str, a, batch_path: str):
        args = [sys.executable, os.path.abspath(__file__), "--_worker", side, "--_batch", batch_path,
                "--model_dir", a.model_dir] + a._passthrough
        env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ, "PYTHONPATH": REPO,
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONWARNINGS": "ignore::FutureWarning"}
        self.side = side
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def read(self, kind: str) -> dict:
        for line in self.p.stdout:
            if line.startswith(kind + " "):
                return json.loads(line[len(kind) + 1:])
        rc = self.p.wait()
        raise SystemExit(f"{self.side} worker exited (code {rc}) before sending {kind}; see its stderr above")

    def ask(self, cmd: str, kind: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read(kind)

    def close(self) -> dict:
        out = self.ask("quit", "DONE")
        self.p.wait()
        return out


# ----------------------------------------------------------------------------- parent
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=False)


def ensure_model(a) -> str:
    if a.model_dir:
        return a.model_dir
    if a.random_init:  # only a config.json: both sides initialise random weights on their device
        shape = QWEN2_7B if a.shape == "qwen2_7b" else dict(
            vocab_size=151936, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
            num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        d = os.path.join(a.cache_dir, f"iopo_bench_random_{a.shape}_{shape['hidden_size']}_{shape['num_hidden_layers']}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                       "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645, **shape}, f)
        return d
    tag = f"h{a.hidden_size}_l{a.num_layers}_f{a.intermediate_size}_n{a.num_heads}_k{a.num_kv_heads}"
    d = os.path.join(a.cache_dir, f"iopo_bench_train_{tag}")
    if not os.path.isfile(os.path.join(d, "model.safetensors")) and not os.path.isfile(
            os.path.join(d, "model.safetensors.index.json")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "iopo_jax.tools.make_tiny_model", "--out", d,
                        "--hidden_size", str(a.hidden_size), "--num_layers", str(a.num_layers),
                        "--intermediate_size", str(a.intermediate_size), "--num_heads", str(a.num_heads),
                        "--num_kv_heads", str(a.num_kv_heads)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
        print(f"made {d} in {time.perf_counter() - t:.0f} s")
    return d


def parse_settings(s: str, groups_override: int | None) -> list[tuple[int, int, int]]:
    out = []
    for item in s.split(","):
        parts = [int(x) for x in item.strip().split(":")]
        if len(parts) not in (2, 3) or min(parts) < 1:
            raise SystemExit(f"--settings: '{item}' must be PROMPT:RESPONSE[:GROUPS] with positive integers")
        p, r, g = (parts + [1])[:3]
        out.append((p, r, groups_override or g))
    return out


def fmt_bytes(b) -> str:
    return f"{b / 2**30:.2f} GiB"


def run_setting(a, setting, hf_cfg) -> dict:
    import numpy as np

    p_len, r_len, groups = setting
    batch = make_batch(groups, p_len, r_len, hf_cfg["vocab_size"], seed=a.seed)
    os.makedirs(a.cache_dir, exist_ok=True)
    batch_path = os.path.join(a.cache_dir, f"iopo_bench_train_batch_{os.getpid()}.npz")
    np.savez(batch_path, **batch)
    b, t = batch["input_ids"].shape
    flops = iopo_step_flops(hf_cfg, batch["seq_lens"].tolist(), batch["resp_lens"].tolist())
    if a.share_prompt:
        print(f"\n(ours: shared prompts, {batch['sp_input_ids'].shape[0]} rows of {batch['sp_input_ids'].shape[1]} "
              f"= {batch['sp_input_ids'].size} padded tokens instead of {b * t})")
    print(f"\n== prompts ~{p_len}, responses ~{r_len}, {groups} group(s) = {b} sequences padded to {t}; "
          f"{int(flops['tokens'])} real tokens ({int(flops['response_tokens'])} response); "
          f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    sides = ["ours"] + ([] if a.skip_torch else ["torch"])
    workers, ready, done, failed = {}, {}, {}, {}
    times = {s: [] for s in sides}
    cpus = {s: [] for s in sides}
    loads = []

    def timed_step(side):
        r = workers[side].ask("step", "STEP")
        times[side].append(r["seconds"])
        cpus[side].append(r["cpu_seconds"])
        loads.append(r["load1"])

    def start(group):
        for side in group:
            workers[side] = Worker(side, a, batch_path)
        for side in group:
            ready[side] = workers[side].read("READY")
            print(f"  {side:5s} ready: setup {ready[side]['setup_s']:.1f} s, first (untimed) step "
                  f"{ready[side]['first_step_s']:.2f} s", flush=True)

    try:
        if a.one_side_at_a_time:  # each side alone on the machine (and its accelerator memory), ours first
            for side in sides:  # a side that fails (e.g. out of memory) is recorded and the other still runs
                try:
                    start([side])
                    for _ in range(a.steps):
                        timed_step(side)
                    done[side] = workers[side].close()
                except (SystemExit, Exception) as e:  # noqa: BLE001
                    failed[side] = str(e) or type(e).__name__
                    print(f"  {side}: FAILED: {failed[side]}", flush=True)
                    if side in workers and workers[side].p.poll() is None:
                        workers[side].p.kill()
            if len(failed) == len(sides):
                raise SystemExit(f"every side failed: {failed}")
        else:  # both load and warm up at the same time (untimed); timed steps alternate and never overlap
            start(sides)
            for i in range(a.steps):
                for side in (sides if i % 2 == 0 else sides[::-1]):
                    timed_step(side)
            done = {s: w.close() for s, w in workers.items()}
    finally:
        for w in workers.values():
            if w.p.poll() is None:
                w.p.kill()
        os.remove(batch_path)
    res = {"setting": {"prompt": p_len, "response": r_len, "groups": groups, "batch": b, "length": t,
                       "padded_tokens": b * t, "real_tokens": int(batch["seq_lens"].sum()),
                       "shared_prompt_padded_tokens": int(batch["sp_input_ids"].size),
                       "shared_prompt_real_tokens": int((batch["sp_segment_ids"] > 0).sum()),
                       "share_prompt": bool(a.share_prompt)},
           "flops": flops, "load1_median": statistics.median(loads), "load1_range": [min(loads), max(loads)]}
    for s, err in failed.items():
        res[s] = {"error": err}
    sides = [s for s in sides if s not in failed]
    for s in sides:
        med = statistics.median(times[s])
        res[s] = {"median_s": med, "min_s": min(times[s]), "max_s": max(times[s]), "times": times[s],
                  "cpu_s": statistics.median(cpus[s]),
                  "tokens_per_s": flops["tokens"] / med, "flops_per_s": flops["total"] / med,
                  "peak_rss": done[s]["peak_rss"], "peak_rss_over_imports": done[s]["peak_rss"] - done[s]["rss_after_imports"],
                  "first_step_s": ready[s]["first_step_s"], "setup_s": ready[s]["setup_s"],
                  "first_logps": ready[s]["first"]["logps"], "first_loss": ready[s]["first"]["loss"],
                  "info": {k: v for k, v in ready[s].items() if k not in ("first", "first_step_s", "setup_s")}}
        if a.peak_tflops:
            res[s]["mfu"] = mfu(flops["total"], med, a.peak_tflops)
    if "torch" in sides and "ours" in sides:
        res["ratio"] = res["ours"]["median_s"] / res["torch"]["median_s"]
        res["cpu_ratio"] = res["ours"]["cpu_s"] / res["torch"]["cpu_s"]
        lo, lt = res["ours"]["first_logps"], res["torch"]["first_logps"]
        res["parity_max_abs"] = max(abs(x - y) for x, y in zip(lo, lt))
        res["parity_max_rel"] = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(lo, lt))
    print_setting(a, res, sides)
    return res


def print_setting(a, res, sides) -> None:
    fl = res["flops"]
    print(f"  model FLOPs per step: {fl['total'] / 1e9:.1f} GFLOP (6N convention; LoRA-exact "
          f"{fl['total_lora_exact'] / 1e9:.1f}); load avg during the timed steps {res['load1_median']:.1f} "
          f"(range {res['load1_range'][0]:.1f}-{res['load1_range'][1]:.1f})")
    hdr = f"  | {'side':5s} | {'median s':>8s} | {'min-max s':>13s} | {'cpu s':>6s} | {'tokens/s':>8s} | {'GFLOP/s':>7s} |" + (
        f" {'MFU':>6s} |" if a.peak_tflops else "") + f" {'peak RSS':>10s} | {'+ over imports':>14s} |"
    print(hdr)
    print("  |" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for s in sides:
        r = res[s]
        line = (f"  | {s:5s} | {r['median_s']:8.3f} | {r['min_s']:6.3f}-{r['max_s']:6.3f} | {r['cpu_s']:6.2f} | "
                f"{r['tokens_per_s']:8.0f} | "
                f"{r['flops_per_s'] / 1e9:7.1f} |")
        if a.peak_tflops:
            line += f" {100 * r['mfu']:5.1f}% |"
        line += f" {fmt_bytes(r['peak_rss']):>10s} | {fmt_bytes(r['peak_rss_over_imports']):>14s} |"
        print(line)
    if "ratio" in res:
        print(f"  ratio ours/torch = {res['ratio']:.3f} (target <= 0.5 on CPU: "
              f"{'MET' if res['ratio'] <= 0.5 else 'NOT MET'}; CPU-time ratio {res['cpu_ratio']:.3f}); first-step policy log-prob sums (mean per column) "
              f"max |diff| {res['parity_max_abs']:.2e} (rel {res['parity_max_rel']:.1e}); first loss "
              f"ours {res['ours']['first_loss']:.6f} torch {res['torch']['first_loss']:.6f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python bench/train_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None,
                   help="HF checkpoint directory (any supported Qwen2 / Llama model, e.g. the fetch_model "
                        "SmolLM2-135M-Instruct; padding uses the last vocabulary row when the vocabulary is smaller "
                        "than Qwen2's); default: a random one made with the size flags below "
                        "and cached in --cache_dir")
    p.add_argument("--hidden_size", type=int, default=64, help="model width of the random model (default: %(default)s, the CPU demo's)")
    p.add_argument("--num_layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--intermediate_size", type=int, default=None, help="MLP width (default: 2 x hidden, as the CPU demo)")
    p.add_argument("--num_heads", type=int, default=4, help="query heads (default: %(default)s)")
    p.add_argument("--num_kv_heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    p.add_argument("--cache_dir", default="/tmp", help="where the random model (and a temporary batch file) go (default: %(default)s)")
    p.add_argument("--settings", default="100:30:4,512:128:1",
                   help="comma list of PROMPT:RESPONSE[:GROUPS]: nominal prompt and response lengths in tokens and "
                        "IOPO groups (4 sequences each) per step; default: the CPU demo's batch (4 groups, prompts "
                        "~100, responses ~30) and a longer one (%(default)s)")
    p.add_argument("--groups", type=int, default=None, help="override GROUPS of every setting")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (median reported) (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (includes compilation) (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=32,
                   help="our log-prob chunk (tokens per vocabulary projection; train.logprob_chunk; the CPU demo "
                        "uses 32) (default: %(default)s)")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"],
                   help="our per-layer activation checkpointing (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both sides (weights are float32 for ours, this dtype for torch) (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="IOPO beta (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate of both sides (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads for the reference (default: all cores, %(default)s)")
    p.add_argument("--torch_device", default="cpu", help="device of the torch reference: cpu or cuda (default: %(default)s)")
    p.add_argument("--torch_attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention implementation (default: %(default)s)")
    p.add_argument("--skip_torch", action="store_true", help="only time our step")
    p.add_argument("--one_side_at_a_time", action="store_true",
                   help="run ours (load, warm-up, timed steps, exit), then torch the same way, instead of keeping both "
                        "workers alive and alternating their steps: on a GPU each side then has the device memory to "
                        "itself (the JAX and torch allocators both keep what they took)")
    p.add_argument("--random_init", action="store_true",
                   help="no checkpoint: both sides initialise random weights on their device from a config.json "
                        "(--shape qwen2_7b, or the --hidden_size/--num_layers/... shape); the two sides then have "
                        "different weights, so the parity line does not apply")
    p.add_argument("--shape", default="custom", choices=["custom", "qwen2_7b"],
                   help="with --random_init: qwen2_7b = Qwen2-7B's architecture (default: the size flags)")
    p.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage dtype of our frozen base weights (LoRA stays float32) (default: %(default)s)")
    p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                   help="our attention (auto: splash on TPU, cuDNN on GPU, xla (dense) elsewhere) (default: %(default)s)")
    p.add_argument("--share_prompt", action="store_true",
                   help="ours: shared-prompt rows [x | y_a | y_b] (2 rows per group instead of 4); FLOPs and "
                        "tokens/s stay those of the 4 unpacked sequences (the useful work)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="peak dense FLOP/s of the device in TFLOP/s (e.g. 989 for an H100 SXM in bf16); when set, "
                        "MFU is printed (CPU: leave 0, achieved GFLOP/s are printed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and of the LoRA init (default: %(default)s)")
    p.add_argument("--json_out", default=None, help="also write all measurements to this JSON file")
    p.add_argument("--_worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--_batch", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.intermediate_size is None:
        a.intermediate_size = 2 * a.hidden_size
    if a._worker:
        import numpy as np

        z = np.load(a._batch)
        batch = {k: z[k] for k in z.files}
        return jax_worker(a, batch) if a._worker == "ours" else torch_worker(a, batch)

    # Flags the workers need, forwarded verbatim.
    a._passthrough = ["--chunk", str(a.chunk), "--remat", a.remat, "--dtype", a.dtype, "--beta", str(a.beta),
                      "--lr", str(a.lr), "--threads", str(a.threads), "--torch_device", a.torch_device,
                      "--torch_attn", a.torch_attn, "--seed", str(a.seed), "--warmup", str(max(1, a.warmup)),
                      "--param_dtype", a.param_dtype, "--attention_impl", a.attention_impl] + (
                      ["--random_init"] if a.random_init else []) + (["--share_prompt"] if a.share_prompt else [])
    settings = parse_settings(a.settings, a.groups)
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()}; {os.cpu_count()} cores")
    a.model_dir = ensure_model(a)
    with open(os.path.join(a.model_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    print(f"model: {a.model_dir} (hidden {hf_cfg['hidden_size']}, {hf_cfg['num_hidden_layers']} layers, vocab "
          f"{hf_cfg['vocab_size']}); {a.dtype}; LoRA r=8 alpha=16 on {','.join(LORA_TARGETS)}; torch threads {a.threads}")
    t_all = time.perf_counter()
    results = [run_setting(a, s, hf_cfg) for s in settings]
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"results": results, "model": hf_cfg, "args": {k: v for k, v in vars(a).items()
                                                                      if not k.startswith("_")}}, f, indent=2)
    bad = [f"{s}: {r[s]['error']}" for r in results for s in ("ours", "torch") if "error" in r.get(s, {})]
    if bad:
        raise SystemExit("failed (the other side's figures are in the output): " + "; ".join(bad))


if __name__ == "__main__":
    main()
