"""Model configuration: one frozen dataclass built from a HF ``config.json``.

Supported: Qwen2 / Qwen2.5 (``model_type: qwen2``) and Llama-3 / 3.1 (``model_type: llama``, with
or without ``llama3`` RoPE scaling). Anything we do not implement (sliding-window attention turned
on, other RoPE scalings, other activations) fails here with a message that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from data_pipeline.schema import from_mapping, parse_list

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ModelConfig field -> HF config.json key, for the fields copied as they are (from_hf).
HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "rms_norm_eps": "rms_norm_eps",
             "max_position_embeddings": "max_position_embeddings", "bos_token_id": "bos_token_id"}
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnsupportedConfigError(ValueError):
    """A HF config field holds a value this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA factors added beside the chosen linear layers (y = W x + (alpha/r) B A x)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS_ALL  # or ("all",); a comma string means the same list

    def __post_init__(self):
        targets = parse_list(self.targets, name="lora.targets")
        object.__setattr__(self, "targets", LORA_TARGETS_ALL if targets == ("all",) else targets)
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be > 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS_ALL]
        if bad:
            raise ValueError(f"lora.targets has unknown layer names {bad}; choose from {LORA_TARGETS_ALL}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus numerics of a decoder-only transformer (Qwen2 or Llama-3)."""

    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 1_000_000.0
    # llama3 RoPE scaling as a tuple: (factor, low_freq_factor, high_freq_factor, original_max_pos).
    rope_llama3: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v bias (Qwen2: True; Llama: config.attention_bias)
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Numerics and memory.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; softmax, norms and log-probs stay float32
    remat: str = "none"  # none | full | dots | dots_no_batch
    # xla: plain einsum attention (any device; [b, n, t, s] scores in memory)
    # chunked: the same maths one block of queries at a time under remat (any device; long sequences)
    # cudnn: jax.nn.dot_product_attention's fused cuDNN kernel (NVIDIA GPUs only)
    # splash: the Pallas TPU splash-attention kernel (causal + segment ids; interpret mode off TPU)
    # auto: splash on TPU, cudnn on GPU, xla (dense) elsewhere (platform of the current mesh's devices)
    attention_impl: str = "auto"
    attention_block: int = 512  # query block of the chunked implementation
    # Run the layers as one lax.scan over their stacked parameters (training / scoring path; the KV-cache
    # path keeps the loop): one compiled layer body instead of num_layers copies. Storage is unchanged.
    scan_layers: bool = False
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type '{self.model_type}' is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got '{self.remat}'")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got '{self.attention_impl}'")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got '{getattr(self, name)}'")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str, **overrides) -> "ModelConfig":
        """Build from a HF config dict, a ``config.json`` path or a checkpoint directory."""
        src = "config"
        if isinstance(hf, str):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config.json not found: {path}")
            src = path
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures")
            raise UnsupportedConfigError(
                f"{src}: model_type '{model_type}' (architectures {arch}) is not supported; "
                f"iopo-jax implements {SUPPORTED_MODEL_TYPES} (Qwen2/Qwen2.5 and Llama-3/3.1)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"{src}: hidden_act '{act}' is not supported (only 'silu')")
        if hf.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                f"{src}: use_sliding_window=true is not supported (sliding-window attention); "
                "set it to false (Qwen2 checkpoints ship it false)")
        if hf.get("mlp_bias", False):
            raise UnsupportedConfigError(f"{src}: mlp_bias=true is not supported")
        rope = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        llama3 = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                llama3 = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                          float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise UnsupportedConfigError(
                    f"{src}: rope_scaling type '{kind}' is not supported (only llama3 scaling)")
        missing = [k for k in HF_REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"{src}: missing field(s) {', '.join(missing)}")
        # the fields of the same meaning and value; absent optional ones take the dataclass defaults
        kw = {ours: hf[key] for ours, key in HF_FIELDS.items() if key in hf}
        heads, eos = hf["num_attention_heads"], hf.get("eos_token_id")
        kw.update(
            model_type=model_type,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_llama3=llama3,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        return from_mapping(cls, {**kw, **overrides}, f"{src if src != 'config' else 'the HF config'} with overrides")

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict that transformers needs to rebuild this architecture."""
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "attention_dropout": 0.0,
        }
        if self.model_type == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        else:
            cfg.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.rope_llama3:
            f, lo, hi, orig = self.rope_llama3
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                   "high_freq_factor": hi, "original_max_position_embeddings": orig}
        return cfg
