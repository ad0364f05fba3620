"""The main job's evaluation with the adapter reuses the base evaluation's compiled sampler: the adapter merged into
the weights answers what the unmerged adapter model answers, and nothing compiles again (fast, tiny model)."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from evaluation import before_after as ba
from evaluation import generate
from iopo_jax.models import LoRAConfig, load_model
from iopo_jax.sampling import Sampler, SamplingParams
from iopo_jax.tools.make_tiny_model import make_tiny_model

PROMPTS = [[11, 22, 33, 44, 55], [7] * 17, [101, 5, 900, 77, 3, 3, 250, 1200, 8, 64, 1234]]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, qwen_tokenizer_dir):
    from iopo_jax.models.lora import export_peft

    base = make_tiny_model(str(tmp_path_factory.mktemp("tiny_ba")), "qwen2", tokenizer_dir=qwen_tokenizer_dir)
    model, _ = load_model(base, lora=LoRAConfig(rank=4, alpha=8.0))
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(3), 200))
    lora = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.5, lora)
    return base, export_peft(nnx.merge(g, lora, rest), str(tmp_path_factory.mktemp("adapter_ba")))


def _job(**kw):
    j = ml_collections.ConfigDict(dict(eval_batch_size=4, eval_max_new_tokens=8, eval_prompt_buckets="32",
                                       eval_continuous=False))
    j.update(kw)
    return j


def _ids(sampler):
    out = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    return [list(c.token_ids) for c in out]


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_merged_adapter_answers_like_the_adapter_without_compiling(base_and_adapter):
    base_dir, adapter = base_and_adapter
    base = ba.base_sampler(_job(), base_dir)
    assert base.batch_buckets == (4,) and base.prompt_buckets[0] == 32 and base.new_token_buckets == (8,)
    assert not base.continuous
    base_answers = _ids(base)
    compiled = dict(base.trace_counts)
    merged = ba.merged_sampler(base, base_dir, adapter)
    merged_answers = _ids(merged)
    assert merged.trace_counts == compiled  # the base programs, new weights
    reference = Sampler.from_pretrained(base_dir, lora=adapter, max_batch_size=4, batch_buckets=(4,),
                                        prompt_buckets=(32,), new_token_buckets=(8,), continuous=False)
    assert merged_answers == _ids(reference)
    assert merged_answers != base_answers  # the adapter changes the answers
    assert _ids(base) == base_answers  # the base sampler keeps its own weights
    # the merged weights are base + (alpha / r) B A
    path = "layers.0.self_attn.q_proj.weight"
    w_merged, w_base = (np.asarray(nnx.to_pure_dict(s.state.layers)["self_attn"]["q_proj"]["weight"][0])
                        for s in (merged, base))  # the sampler holds the layers stacked: [layers, ...]
    model, _ = load_model(base_dir, lora=LoRAConfig(rank=4, alpha=8.0))
    from iopo_jax.models.lora import load_adapter_into, lora_params

    lp = lora_params(load_adapter_into(model, adapter))
    a, b = np.asarray(lp[path[:-len("weight")] + "lora_a"]), np.asarray(lp[path[:-len("weight")] + "lora_b"])
    np.testing.assert_allclose(w_merged, w_base + 2.0 * (b @ a), rtol=1e-5, atol=1e-5)


def test_provided_samplers_serve_the_evaluations(tmp_path, monkeypatch):
    """evaluation.generate answers (model_dir, lora) from the provided factory, made on first use only."""
    import types

    made = []

    class FakeSampler:
        continuous = False  # batch-level, as the main job's shared sampler

        def generate(self, batch, params, seeds=None):
            return [types.SimpleNamespace(text=f"{len(made)}:{m[0]['content']}", finish_reason="stop",
                                          token_ids=[1]) for m in batch]

    def factory():
        made.append(FakeSampler())
        return made[-1]

    jobs = ba._Samplers(_job(), str(tmp_path), "adapter")  # pylint: disable=protected-access
    monkeypatch.setattr(jobs, "get_after", factory)
    generate.provide_sampler(str(tmp_path), "adapter", lambda: jobs.get_after())
    try:
        kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0, ids=["x"], lora="adapter")
        conv = [[{"role": "user", "content": "hi"}]]
        assert generate.jax_sampler_generate(str(tmp_path), conv, **kw) == ["1:hi"]
        # the evaluation runner's generator (what before_after's evaluations call) answers from it too
        gen = generate.JaxSamplerGenerator(str(tmp_path), temperature=0.0, top_p=1.0, max_new_tokens=8,
                                           batch_size=2, lora="adapter")
        reqs = [types.SimpleNamespace(id=f"u{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(3)]
        assert [(r.id, r.text) for r in gen.generate(reqs)] == [("u0", "2:q0"), ("u1", "2:q1"), ("u2", "2:q2")]
        assert jobs.base is None  # the base sampler was not needed
    finally:
        jobs.close()
    assert (str(tmp_path), "adapter") not in generate._PROVIDED  # pylint: disable=protected-access
    assert (str(tmp_path), "") not in generate._PROVIDED  # pylint: disable=protected-access


def test_base_sampler_bucket_errors(base_and_adapter):
    with pytest.raises(ValueError, match="job.eval_prompt_buckets"):
        ba.base_sampler(_job(eval_prompt_buckets="a,b"), base_and_adapter[0])
