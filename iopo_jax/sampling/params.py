"""Sampling settings and results of the sampler (plain dataclasses, no JAX)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

FINISH_STOP = "stop"  # an EOS / stop token id or a stop string ended the completion
FINISH_LENGTH = "length"  # max_new_tokens was reached


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion (or ``n`` completions) of a prompt.

    temperature: 0 means greedy (arg-max); > 0 samples from ``softmax(logits / temperature)``.
    top_p: nucleus sampling mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: upper bound on generated tokens (EOS / stop token included).
    seed: PRNG seed; completions with the same seed, prompt and settings are reproducible,
        whatever else is in the batch. None: a fresh random seed per call.
    n: completions per prompt (sample ``i`` uses key ``(seed, i)``).
    stop: stop strings, matched on the decoded text of the completion; the text is cut before
        the match (or after it with ``include_stop_str_in_output``) and the token ids are cut after
        the token that completes it.
    stop_token_ids: extra token ids that end a completion (besides the model's EOS ids).
    ignore_eos: do not stop on the model's EOS ids (stop_token_ids still apply).
    logprobs: return the log-prob of every generated token under the model's raw distribution
        (``log_softmax(logits)``, before temperature / top-k / top-p), as RL needs for old log-probs.
    skip_special_tokens: drop special tokens (e.g. ``<|im_end|>``) from the decoded text.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: Optional[int] = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")
        _check(all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, msg: str):
    if not ok:
        raise ValueError(msg)


@dataclasses.dataclass
class Completion:
    """One generated completion.

    ``token_ids`` include the token that ended the completion (EOS or a stop token id) when there
    is one, so that RL can train on it; ``text`` never shows it. ``logprobs[i]`` belongs to
    ``token_ids[i]`` (None unless requested).
    """

    index: int  # position of the prompt in the generate() call
    sample_index: int  # 0 .. n-1
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: Union[int, str, None] = None  # the stop token id or stop string, when finish_reason == "stop"
    logprobs: Optional[list[float]] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class GenerationStats:
    """Counters of one generate() call (also accumulated over a Sampler's life in ``total_stats``)."""

    num_sequences: int = 0
    prompt_tokens: int = 0  # real prompt tokens (no padding)
    generated_tokens: int = 0
    prefill_s: float = 0.0  # wall time in prefill calls (compilation included)
    decode_s: float = 0.0  # wall time in decode calls (compilation included)
    batches: int = 0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    def add(self, other: "GenerationStats"):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return d


Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclasses.dataclass(eq=False)
class Row:
    """One sequence to generate (low-level unit used by :meth:`Sampler.run_rows` and the server).

    ``on_update(row, delta_text, finished)`` (optional) is called from the sampler's thread after
    every decode chunk with the new stable text; set ``row.cancelled = True`` from any thread to
    stop the row at the next chunk boundary.
    """

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    prompt_index: int = 0
    sample_index: int = 0
    key_index: Optional[int] = None  # folded into the PRNG key with seed and sample_index; default prompt_index
    on_update: Optional[Callable[["Row", str, bool], None]] = None
    cancelled: bool = False
    # results
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    finished: bool = False
    _emitted: int = 0  # characters of text already passed to on_update

    def completion(self) -> Completion:
        return Completion(index=self.prompt_index, sample_index=self.sample_index,
                          prompt_token_ids=list(self.prompt_ids), token_ids=list(self.token_ids), text=self.text,
                          finish_reason=self.finish_reason or FINISH_LENGTH, stop_reason=self.stop_reason,
                          logprobs=list(self.logprobs) if self.params.logprobs else None)
