"""Smaller fixes of issue 18: PEFT alpha_pattern refused on import; evaluation seeds from unit ids."""
import json

import pytest

from evaluation import driver, generate
from iopo_jax.models.lora import read_adapter_config
from iopo_jax.models.safetensors_io import CheckpointError


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
    """Records the PRNG key (seed, key index) each row samples with (the Sampler's rule); finishes one row
    per step, the last one submitted first, so completion order differs from submission order."""

    def __init__(self):
        self.keys = {}
        self.queue = []

    def encode(self, conversation, *, apply_chat_template=False, where=""):
        return [len(conversation[0]["content"])]

    def check_length(self, n, max_new_tokens, *, where=""):
        pass

    def submit(self, rows):
        self.queue.extend(rows)

    def step(self):
        if not self.queue:
            return False
        r = self.queue.pop()
        r.text, r.token_ids, r.finished = f"answer {r.prompt_index}", [1, 2], True
        self.keys[r.prompt_index] = (r.seed, r.key_index if r.key_index is not None else r.prompt_index)
        return True

    def reset_scheduler(self):
        self.queue = []


def test_eval_sampling_seed_follows_the_unit_not_its_batch_position(tmp_path, monkeypatch):
    fake = _FakeSampler()
    monkeypatch.setattr(generate, "_cached_sampler", lambda model_dir, lora, scan_layers: fake)
    gen = generate.JaxSamplerGenerator(str(tmp_path), temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=2,
                                       seed=7)

    def run(ids):
        fake.keys = {}
        reqs = [driver.GenRequest(i, [{"role": "user", "content": i}]) for i in ids]
        results = {r.id: r.text for r in gen.generate(reqs)}
        assert results == {i: f"answer {k}" for k, i in enumerate(ids)}
        return {i: fake.keys[k] for k, i in enumerate(ids)}

    full = run(["u1#0", "u2#0", "u3#0", "u4#0"])
    resumed = run(["u2#0", "u3#0", "u4#0"])  # u1 done before the interruption: the others move up one place
    assert resumed == {i: full[i] for i in resumed}
    assert len(set(full.values())) == 4
    assert full["u3#0"][0] == generate.unit_seed(7, "u3#0")


def test_eval_writes_each_answer_as_it_finishes_and_a_crash_keeps_them(tmp_path, monkeypatch):
    """Answers reach predictions.jsonl one by one (with finish reason and token count), so a crash in the
    middle of a window keeps every finished answer and the rerun generates only the rest."""
    fake = _FakeSampler()
    monkeypatch.setattr(generate, "_cached_sampler", lambda model_dir, lora, scan_layers: fake)
    gen = generate.JaxSamplerGenerator(str(tmp_path), temperature=0.0, top_p=1.0, max_new_tokens=8, batch_size=3)
    units = [driver.GenUnit(f"u{k}", [[{"role": "user", "content": f"q{k}"}]]) for k in range(5)]
    path = str(tmp_path / "predictions.jsonl")
    step, calls = fake.step, []

    def crashing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return step()

    fake.step = crashing_step
    with pytest.raises(RuntimeError, match="simulated crash"):
        driver.run_generation(units, gen, path, progress=False)
    kept = [json.loads(line) for line in open(path)]
    assert len(kept) == 2 and fake.queue == []  # two answers written; the interrupted window was dropped
    assert all(r["finish_reason"] == "length" and r["new_tokens"] == 2 for r in kept)
    fake.step = step
    out, stats = driver.run_generation(units, gen, path, progress=False)
    assert stats["reused"] == 2 and stats["generated"] == 3 and len(out) == 5
    assert sorted(json.loads(line)["id"] for line in open(path)) == [f"u{k}" for k in range(5)]
