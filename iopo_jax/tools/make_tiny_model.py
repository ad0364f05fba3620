"""Write a small random Qwen2 or Llama model in HF format, with the real Qwen2 tokenizer.

The vocabulary is the full 151,936 rows of Qwen2 so that the real tokenizer works with it.
Used by the CPU demo and the tests; also handy for smoke tests of a new setup. Sizes are flags,
so the same tool makes larger checkpoints for benchmarks.

Example::

    python -m iopo_jax.tools.make_tiny_model --out /tmp/tiny-qwen2
    python -m iopo_jax.tools.make_tiny_model --out /tmp/tiny-llama --family llama
"""
from __future__ import annotations

import os

from absl import flags
from flax import nnx

from data_pipeline import cli
from data_pipeline.tokenizer import build_qwen2_tokenizer
from iopo_jax.models.config import ModelConfig
from iopo_jax.models.transformer import Transformer
from iopo_jax.models.weights import copy_tokenizer, export_hf

FAMILY_DEFAULTS = {
    "qwen2": dict(model_type="qwen2", rope_theta=1_000_000.0, attention_bias=True, tie_word_embeddings=True),
    "llama": dict(model_type="llama", rope_theta=500_000.0, attention_bias=False, tie_word_embeddings=False,
                  rope_llama3=(8.0, 1.0, 4.0, 8192)),
}


def tiny_config(family: str = "qwen2", *, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                tie_word_embeddings: bool | None = None, vocab_size: int = 151936):
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"--family must be one of {sorted(FAMILY_DEFAULTS)}, got '{family}'")
    kw = dict(FAMILY_DEFAULTS[family])
    if tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = tie_word_embeddings
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=32768,
        eos_token_id=151645, bos_token_id=151643, **kw)


def make_tiny_model(out: str, family: str = "qwen2", seed: int = 0, dtype: str = "float32",
                    tokenizer_dir: str | None = None, **sizes) -> str:
    """Create the model directory ``out`` (config.json, model.safetensors, tokenizer files)."""
    cfg = tiny_config(family, **sizes)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    os.makedirs(out, exist_ok=True)
    export_hf(model, out, dtype=dtype)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, out)
    else:
        build_qwen2_tokenizer(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        f.write('{"eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": false}\n')
    return out


PROG = "python -m iopo_jax.tools.make_tiny_model"


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", None, "output directory (created if missing)", flag_values=fv)
    f.DEFINE_enum("family", "qwen2", sorted(FAMILY_DEFAULTS), "architecture family", flag_values=fv)
    f.DEFINE_integer("hidden_size", 64, "model width d", flag_values=fv)
    f.DEFINE_integer("intermediate_size", 128, "MLP width", flag_values=fv)
    f.DEFINE_integer("num_layers", 2, "decoder layers", flag_values=fv)
    f.DEFINE_integer("num_heads", 4, "query heads", flag_values=fv)
    f.DEFINE_integer("num_kv_heads", 2, "key/value heads (GQA when < num_heads)", flag_values=fv)
    f.DEFINE_enum("tie_word_embeddings", "default", ["default", "true", "false"],
                  "share the embedding and the output projection (default: true for qwen2, false for llama)",
                  flag_values=fv)
    f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of the saved weights", flag_values=fv)
    f.DEFINE_integer("seed", 0, "random seed of the weights", flag_values=fv)
    f.mark_flag_as_required("out", flag_values=fv)


def _main(a, positional) -> int:
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    tie = None if a.tie_word_embeddings == "default" else a.tie_word_embeddings == "true"
    make_tiny_model(a.out, a.family, a.seed, a.dtype, hidden_size=a.hidden_size,
                    intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
                    num_kv_heads=a.num_kv_heads, tie_word_embeddings=tie)
    print(f"wrote a random {a.family} model to {a.out}")
    return 0


main = cli.command(PROG, __doc__, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
