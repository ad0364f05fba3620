"""Model + weights: logit parity with transformers, sharded parity, export round trip, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from iopo_jax.models import CheckpointError, ModelConfig, UnsupportedConfigError, export_hf, load_model, padding_inputs
from iopo_jax.sharding import MeshError, make_mesh, use_mesh

VOCAB = 1024


def _hf_model(family, tie, gqa=True, llama3=True):
    """A tiny random model written by transformers itself."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=1_000_000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if llama3 else None
        kw = dict(rope_parameters=rope) if rope else dict(rope_theta=500000.0)
        cfg = transformers.LlamaConfig(**kw, **common)
        model = transformers.LlamaForCausalLM(cfg)
    # Give biases and norms non-trivial values so that a wrong mapping cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _batch():
    rng = np.random.RandomState(1)
    ids = rng.randint(0, VOCAB, (4, 16))
    am = np.ones_like(ids)
    am[1, :5] = 0  # left padding
    am[2, 11:] = 0  # right padding
    am[3, :2] = 0
    am[3, 14:] = 0
    return ids, am


def _torch_logits(model, ids, am):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.float().numpy()


def _jax_logits(model, ids, am):
    pos, seg = padding_inputs(jnp.asarray(am))
    hidden, _ = model(jnp.asarray(ids), pos, seg)
    return np.asarray(model.logits(hidden))


@pytest.fixture(scope="module", params=[("qwen2", True), ("qwen2", False), ("llama", False), ("llama", True)],
                ids=["qwen2-tied", "qwen2-untied", "llama3-untied", "llama3-tied"])
def hf_checkpoint(request, tmp_path_factory):
    family, tie = request.param
    model = _hf_model(family, tie)
    d = str(tmp_path_factory.mktemp(f"{family}_{tie}"))
    model.save_pretrained(d, safe_serialization=True)
    return family, d, model


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """One tied Qwen2 checkpoint for the checks that need only one family."""
    model = _hf_model("qwen2", True)
    d = str(tmp_path_factory.mktemp("qwen2_single"))
    model.save_pretrained(d, safe_serialization=True)
    return "qwen2", d, model


def test_logit_parity_with_transformers(hf_checkpoint):
    _, d, tmodel = hf_checkpoint
    ids, am = _batch()
    ref = _torch_logits(tmodel, ids, am)
    model, _ = load_model(d)
    out = _jax_logits(model, ids, am)
    m = am.astype(bool)
    assert np.abs(out - ref)[m].max() <= 1e-4


def test_config_reads_llama3_scaling(hf_checkpoint):
    family, d, _ = hf_checkpoint
    cfg = ModelConfig.from_hf(d)
    assert cfg.model_type == family
    if family == "llama":
        assert cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
        assert not cfg.attention_bias
    else:
        assert cfg.attention_bias and cfg.rope_llama3 is None


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}], ids=["fsdp4xtp2", "dp2xfsdp4"])
def test_sharded_logits_equal_single_device(qwen_checkpoint, mesh_shape):
    family, d, _ = qwen_checkpoint
    assert jax.device_count() == 8, "conftest forces 8 host devices"
    ids, am = _batch()
    ref = _jax_logits(load_model(d)[0], ids, am)
    mesh = make_mesh(mesh_shape)
    model, _ = load_model(d, mesh=mesh)
    # Parameters really are distributed.
    w = model.layers[0].mlp.gate_proj.weight[...]
    assert len(w.sharding.device_set) == 8
    assert w.addressable_shards[0].data.size < w.size
    with use_mesh(mesh):
        out = jax.jit(lambda i, a: _jax_logits_traced(model, i, a))(jnp.asarray(ids), jnp.asarray(am))
    m = am.astype(bool)
    assert np.abs(np.asarray(out) - ref)[m].max() <= 1e-5


def _jax_logits_traced(model, ids, am):
    pos, seg = padding_inputs(am)
    hidden, _ = model(ids, pos, seg)
    return model.logits(hidden)


def test_export_round_trip_is_exact(hf_checkpoint, tmp_path):
    _, d, tmodel = hf_checkpoint
    model, cfg = load_model(d)
    out = export_hf(model, str(tmp_path / "exported"), max_shard_bytes=100_000)  # force several shards
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    model2, _ = load_model(out)
    from iopo_jax.models.weights import base_params

    a, b = base_params(model), base_params(model2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    # transformers loads the export and gives the same logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, am = _batch()
    m = am.astype(bool)
    assert np.abs(_torch_logits(reloaded, ids, am) - _torch_logits(tmodel, ids, am))[m].max() == 0.0


def test_bf16_compute_close_to_fp32(qwen_checkpoint):
    family, d, _ = qwen_checkpoint
    ids, am = _batch()
    ref = _jax_logits(load_model(d)[0], ids, am)
    out = _jax_logits(load_model(d, dtype="bfloat16", remat="full")[0], ids, am)
    m = am.astype(bool)
    assert np.abs(out - ref)[m].max() < 0.05 * np.abs(ref).max() + 0.05


def test_chunked_attention_equals_full(qwen_checkpoint):
    _, d, _ = qwen_checkpoint
    ids, am = _batch()
    ref = _jax_logits(load_model(d)[0], ids, am)
    out = _jax_logits(load_model(d, attention_impl="chunked", attention_block=5)[0], ids, am)
    m = am.astype(bool)
    assert np.abs(out - ref)[m].max() <= 1e-5


def test_packed_segments_equal_separate_sequences(qwen_checkpoint):
    family, d, _ = qwen_checkpoint
    model, _ = load_model(d)
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, VOCAB, 7), rng.randint(0, VOCAB, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    h, _ = model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    packed_logits = np.asarray(model.logits(h))[0]
    la = np.asarray(model.logits(model(jnp.asarray(a[None]))[0]))[0]
    lb = np.asarray(model.logits(model(jnp.asarray(b[None]))[0]))[0]
    np.testing.assert_allclose(packed_logits[:7], la, atol=1e-5)
    np.testing.assert_allclose(packed_logits[7:12], lb, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_error_missing_directory_and_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "does-not-exist"))
    (tmp_path / "config.json").write_text(json.dumps(_hf_model("qwen2", True).config.to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_error_corrupt_safetensors(qwen_checkpoint, tmp_path):
    family, d, _ = qwen_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    blob = open(os.path.join(d, "model.safetensors"), "rb").read()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file.*model\.safetensors|model\.safetensors.*corrupt"):
        load_model(str(bad))
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(str(bad))


def test_error_shape_and_key_mismatch(qwen_checkpoint, tmp_path):
    family, d, _ = qwen_checkpoint
    cfg = json.load(open(os.path.join(d, "config.json")))
    (tmp_path / "model.safetensors").symlink_to(os.path.join(d, "model.safetensors"))
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight. has shape"):
        load_model(str(tmp_path))
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\."):
        load_model(str(tmp_path))
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\..*' is missing"):
        load_model(str(tmp_path))


def test_error_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UnsupportedConfigError, match="model_type 'mistral'.*not supported"):
        load_model(str(tmp_path))
    cfg = _hf_model("qwen2", True).config.to_dict()
    cfg["use_sliding_window"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        load_model(str(tmp_path))


def test_error_mesh_does_not_divide_devices():
    with pytest.raises(MeshError, match="does not divide the 8 available devices"):
        make_mesh({"fsdp": -1, "tensor": 3})
    with pytest.raises(MeshError, match="needs 6 devices but 8 are available"):
        make_mesh({"fsdp": 3, "tensor": 2})


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_make_tiny_model_cli(tmp_path, family, qwen_tokenizer_dir):
    """The tiny maker's real command line: HF-format model that transformers and our loader agree on."""
    import subprocess
    import sys

    out = tmp_path / family
    r = subprocess.run([sys.executable, "-m", "iopo_jax.tools.make_tiny_model", f"--out={out}", f"--family={family}",
                        "--num_layers=1"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(out / "config.json"))
    assert cfg["vocab_size"] == 151936 and cfg["model_type"] == family
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = np.array([tok.encode("Hello world, 你好")])
    am = np.ones_like(ids)
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, _ = load_model(str(out))
    assert np.abs(_torch_logits(tm, ids, am) - _jax_logits(ours, ids, am)).max() <= 1e-4
