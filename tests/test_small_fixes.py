"""Smaller fixes of issue 18: PEFT alpha_pattern refused on import; evaluation seeds from unit ids."""
import json

import pytest

from evaluation import driver, generate
from iopo_jax.models.lora import read_adapter_config
from iopo_jax.models.weights import CheckpointError


def _adapter(tmp_path, **extra):
    c = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **extra}
    (tmp_path / "adapter_config.json").write_text(json.dumps(c))
    return str(tmp_path)


def test_alpha_pattern_is_refused_with_a_clear_error(tmp_path):
    cfg = read_adapter_config(_adapter(tmp_path, alpha_pattern={}, rank_pattern={}))
    assert cfg.rank == 8 and cfg.alpha == 16.0
    with pytest.raises(CheckpointError, match=r"adapter_config.json: alpha_pattern=.*q_proj.* not supported"):
        read_adapter_config(_adapter(tmp_path, alpha_pattern={"q_proj": 64}))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        read_adapter_config(_adapter(tmp_path, rank_pattern={"v_proj": 4}))


class _FakeSampler:
    """Records the PRNG key (seed, key index) each prompt would sample with (the Sampler's rule)."""

    def __init__(self):
        self.keys = {}

    def _record(self, conversations, params, seeds):
        out = []
        for i, c in enumerate(conversations):
            key = (params.seed, i) if seeds is None else (int(seeds[i]), 0)
            self.keys[c[0]["content"]] = key
            out.append(type("C", (), {"text": f"answer to {c[0]['content']}"})())
        return out

    def chat(self, conversations, params):
        return self._record(conversations, params, None)

    def generate(self, prompts, params, *, apply_chat_template=False, seeds=None):
        return self._record(prompts, params, seeds)


def test_eval_sampling_seed_follows_the_unit_not_its_batch_position(tmp_path, monkeypatch):
    fake = _FakeSampler()
    monkeypatch.setattr(generate, "_cached_sampler", lambda model_dir, lora: fake)
    gen = generate.JaxSamplerGenerator(str(tmp_path), temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=2,
                                       seed=7)

    def run(ids):
        reqs = [driver.GenRequest(i, [{"role": "user", "content": i}]) for i in ids]
        results = {r.id: r.text for r in gen.generate(reqs)}
        assert results == {i: f"answer to {i}" for i in ids}
        return {i: fake.keys[i] for i in ids}

    full = run(["u1#0", "u2#0", "u3#0", "u4#0"])
    resumed = run(["u2#0", "u3#0", "u4#0"])  # u1 done before the interruption: the others move up one place
    assert resumed == {i: full[i] for i in resumed}
    assert len(set(full.values())) == 4
    assert full["u3#0"][0] == generate.unit_seed(7, "u3#0")
