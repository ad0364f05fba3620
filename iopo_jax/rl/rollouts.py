"""Rollouts for GRPO / SegPO: G samples per prompt from the policy, segmentation, teacher-forced log-probs.

One RL iteration's data, in order:

1. :func:`encode_prompts` renders each prompt with the chat template (the same strings as training, see
   :mod:`data_pipeline.templates`) and encodes it;
2. :func:`sample_groups` draws ``G`` completions per prompt with the JAX sampler from the current policy
   (base + LoRA, no merge: call ``sampler.update_model(policy_model)`` after every update). Completions
   keep the token that ended them (``<|im_end|>``), which is trained on like any other response token;
3. :func:`segment_rollouts` decodes each completion's token ids to bytes (so the text and the token
   offsets agree exactly, whatever the tokenizer would re-tokenise) and maps every token to its
   sub-instruction slot (:mod:`iopo_jax.rl.segments`);
4. :func:`pack_rollouts` lays prompt + response rows out right-padded to a static length, with labels on
   the response tokens only; :func:`scatter_response` places per-response-token values (segment ids,
   sampler log-probs) at their label columns;
5. :func:`policy_token_logps` (jitted by the caller) gives ``log pi(y_t | x, y_<t)`` of every response
   token, teacher-forced, for the policy (the old log-probs of the ratio) and for the reference (LoRA off).

The policy is ``softmax(logits / temperature)``: sampling and every log-prob of the loss use the same
temperature (as verl does), so the ratio and the KL are taken between the distributions actually
sampled from. The sampler also reports raw log-probs (temperature 1); with ``temperature == 1`` they
must equal the teacher-forced ones, which the loop checks and logs (``rollout/sampler_logp_maxdiff``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from data_pipeline.hashing import seed63
from data_pipeline.templates import get_template
from data_pipeline.tokenization import encode
from iopo_jax.logprobs import IGNORE_INDEX, token_logprobs
from iopo_jax.models.transformer import lm_head_logits
from iopo_jax.rl.segments import hf_token_bytes, offsets_from_token_bytes, segment_response


def encode_prompts(tokenizer, users: Sequence[str], template: str = "qwen", system: Optional[str] = None
                   ) -> list[list[int]]:
    """Token ids of the chat prompt (system + user + assistant header) of each user message."""
    tpl = get_template(template)
    return [encode(tokenizer, tpl.prompt(u, system)) for u in users]


def iteration_seed(seed: int, step: int) -> int:
    """Sampling seed of RL iteration ``step`` (a pure function: resumed runs draw the same samples)."""
    return seed63(f"rl-rollout|{seed}|{step}")


def sample_groups(sampler, prompt_ids: Sequence[Sequence[int]], group_size: int, params, seed: int):
    """``len(prompt_ids) * group_size`` completions, prompt-major (rows ``p*G .. p*G+G-1`` are group p)."""
    return sampler.generate([list(p) for p in prompt_ids], params.replace(n=group_size, seed=seed))


@dataclasses.dataclass
class Segmented:
    texts: list[str]  # decoded responses (special tokens dropped), exactly what the offsets index
    token_segment: list[np.ndarray]  # per rollout [len(response)] slot of each token, -1 outside
    found: np.ndarray  # [N, num_slots] the rollout has a section for segment slot j
    format_ok: np.ndarray  # [N] one heading per sub-instruction, in order


def segment_rollouts(tokenizer, response_ids: Sequence[Sequence[int]], expected_ids: Sequence[Sequence[int]],
                     num_slots: int) -> Segmented:
    """Decode and segment every response (``expected_ids[i]``: heading numbers of rollout i's prompt)."""
    n = len(response_ids)
    texts, segs = [], []
    found = np.zeros((n, num_slots), bool)
    fmt = np.zeros((n,), np.int32)
    vocab = len(tokenizer)
    for i, (ids, exp) in enumerate(zip(response_ids, expected_ids)):
        # Ids past the tokenizer (the padded rows of the model's vocabulary, which an untrained model
        # can sample) have no text: they get empty bytes, like special tokens.
        known = [t for t in ids if t < vocab]
        it = iter(hf_token_bytes(tokenizer, known))
        text, offsets = offsets_from_token_bytes([next(it) if t < vocab else b"" for t in ids])
        r = segment_response(text, offsets, list(exp))
        texts.append(text)
        segs.append(r.token_segment)
        found[i, :r.found.shape[0]] = r.found
        fmt[i] = r.format_ok
    return Segmented(texts, segs, found, fmt)


def bucket_length(n: int, step: int, maximum: int) -> int:
    """``n`` rounded up to a multiple of ``step`` (0: always ``maximum``), at most ``maximum``."""
    if step <= 0:
        return maximum
    return min(maximum, -(-n // step) * step)


def pack_rollouts(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], length: int,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded ``[N, length]`` rows ``prompt + response``: ``input_ids``, ``labels`` (response tokens,
    -100 elsewhere), ``positions``, ``segment_ids`` (1 on real tokens), ``response_mask`` (labels set) and
    ``response_start`` ``[N]`` (column of the first response token)."""
    n = len(prompt_ids)
    ids = np.full((n, length), pad_id, np.int32)
    labels = np.full((n, length), IGNORE_INDEX, np.int32)
    seg = np.zeros((n, length), np.int32)
    start = np.zeros((n,), np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        lp, lr = len(p), len(r)
        if lp + lr > length:
            raise ValueError(f"rollout {i}: {lp} prompt + {lr} response tokens > row length {length}")
        if lp < 1:
            raise ValueError(f"rollout {i}: empty prompt")
        ids[i, :lp], ids[i, lp:lp + lr] = p, r
        labels[i, lp:lp + lr] = r
        seg[i, :lp + lr] = 1
        start[i] = lp
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy()
    return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": seg,
            "response_mask": labels != IGNORE_INDEX, "response_start": start}


def scatter_response(values: Sequence[Sequence], start: np.ndarray, length: int, fill=0,
                     dtype=np.float32) -> np.ndarray:
    """``[N, length]`` array with ``values[i][t]`` at column ``start[i] + t`` (``fill`` elsewhere)."""
    out = np.full((len(values), length), fill, dtype)
    for i, v in enumerate(values):
        v = np.asarray(v, dtype)
        out[i, start[i]:start[i] + v.shape[0]] = v
    return out


def policy_token_logps(model, batch: dict, *, temperature: float = 1.0, chunk: int = 256,
                       max_label_tokens: Optional[int] = None, remat: bool = True) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced ``log softmax(logits / temperature)`` of each label token: ``(logp [B, T], mask [B, T])``
    aligned with ``batch["labels"]`` (memory-bounded, see :func:`iopo_jax.logprobs.token_logprobs`)."""
    hidden, _ = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    w = model.lm_head_weight()
    dt = hidden.dtype
    inv_t = 1.0 / float(temperature)

    def head(h):
        logits = lm_head_logits(h, w, dt)
        return logits if inv_t == 1.0 else logits * inv_t

    return token_logprobs(hidden, head, batch["labels"], chunk_size=chunk, max_label_tokens=max_label_tokens,
                          remat=remat)
