"""LoRA adapters: PEFT export loads in peft with the same logits; merged export; import round trip."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from iopo_jax.models import LoRAConfig, load_model, padding_inputs
from iopo_jax.models.lora import export_merged, export_peft, load_model_with_adapter, lora_params, merged_params

from test_model import _batch, _hf_model, _jax_logits, _torch_logits


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def trained_like(request, tmp_path_factory):
    """A transformers checkpoint and our model with random (non-zero) LoRA factors on it."""
    family = request.param
    tmodel = _hf_model(family, tie=family == "qwen2")
    d = str(tmp_path_factory.mktemp(f"lora_{family}"))
    tmodel.save_pretrained(d, safe_serialization=True)
    targets = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj") if family == "llama" else LoRAConfig().targets
    model, cfg = load_model(d, lora=LoRAConfig(rank=4, alpha=8.0, targets=targets))
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    lora = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.05, lora)
    return family, d, tmodel, nnx.merge(g, lora, rest)


def test_lora_starts_as_noop(trained_like):
    _, d, tmodel, _ = trained_like
    model, _ = load_model(d, lora=LoRAConfig(rank=4, alpha=8.0))
    ids, am = _batch()
    base, _ = load_model(d)
    np.testing.assert_array_equal(_jax_logits(model, ids, am), _jax_logits(base, ids, am))
    assert all(float(jnp.abs(v).max()) == 0 for k, v in lora_params(model).items() if k.endswith("lora_b"))


def test_peft_export_matches_peft(trained_like, tmp_path):
    family, d, tmodel, model = trained_like
    out = export_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=d)
    ids, am = _batch()
    ours = _jax_logits(model, ids, am)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    ref = _torch_logits(pm, ids, am)
    m = am.astype(bool)
    assert np.abs(ours - ref)[m].max() <= 1e-4
    # The adapter really changes the output (the test would pass trivially otherwise).
    assert np.abs(ours - _torch_logits(tmodel, ids, am))[m].max() > 1e-3
    # Import: base + adapter in our loader reproduces the model.
    again, _ = load_model_with_adapter(d, out)
    np.testing.assert_allclose(_jax_logits(again, ids, am), ours, atol=1e-6)


def test_merged_export_matches(trained_like, tmp_path):
    family, d, tmodel, model = trained_like
    out = export_merged(model, str(tmp_path / "merged"))
    ids, am = _batch()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    m = am.astype(bool)
    assert np.abs(_torch_logits(merged, ids, am) - _jax_logits(model, ids, am))[m].max() <= 1e-4
    # merged_params leaves the model's own base weights untouched.
    base_w = model.layers[0].self_attn.q_proj.weight[...]
    assert not np.array_equal(np.asarray(merged_params(model)["layers.0.self_attn.q_proj.weight"]), np.asarray(base_w))
