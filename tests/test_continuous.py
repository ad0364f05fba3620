"""Continuous batching: equal to the batch-level engine, prefix sharing, admission order, bounded compilations."""
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models import ModelConfig, Transformer
from iopo_jax.sampling import Row, Sampler, SamplingParams

VOCAB = 512
# One cache bucket and one batch bucket keep the number of compilations (the cost of these tests) small.
KW = dict(eos_token_ids=[], max_batch_size=8, batch_buckets=(8,), max_model_len=160, prompt_buckets=(16, 64, 128),
          new_token_buckets=(16,), cache_buckets=(160,), prefill_chunk=32, decode_chunk=4, prefill_budget=64)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def samplers(model):
    return Sampler(model, None, continuous=False, **KW), Sampler(model, None, **KW)


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(1, VOCAB, n)] for n in lengths]


LENGTHS = [3, 100, 7, 20, 5, 120, 9, 11, 2, 40, 33]  # more rows than slots: rows join as others finish


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=16, logprobs=True),
    pytest.param(SamplingParams(max_new_tokens=13, temperature=1.0, top_k=40, seed=3, n=2,
                                stop_token_ids=(5, 7, 9, 11, 13), logprobs=True), marks=[pytest.mark.slow, pytest.mark.heavy]),
], ids=["greedy", "sampled_n2_stop_ids"])
def test_continuous_equals_batch_level(samplers, params):
    static, cont = samplers
    prompts = _prompts(LENGTHS)
    ref, out = static.generate(prompts, params), cont.generate(prompts, params)
    assert len({tuple(o.token_ids) for o in ref}) > len(ref) // 2, "degenerate model: outputs should differ"
    for a, b in zip(ref, out):
        assert (b.index, b.sample_index) == (a.index, a.sample_index)
        assert b.token_ids == a.token_ids, f"prompt {a.index} sample {a.sample_index}"
        assert b.finish_reason == a.finish_reason and b.stop_reason == a.stop_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)
    if params.stop_token_ids:
        assert {o.finish_reason for o in out} == {"stop", "length"}  # rows left the batch at different steps


@pytest.mark.slow
@pytest.mark.heavy
def test_prefix_shared_equals_independent_samples(model):
    shared = Sampler(model, None, **KW)
    indep = Sampler(model, None, prefix_sharing=False, **KW)
    prompts = _prompts([50, 6])
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=21, n=4, logprobs=True)
    a, b = shared.generate(prompts, params), indep.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in a]), np.concatenate([o.logprobs for o in b]),
                               atol=1e-5)
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # the samples of one prompt differ
    # 2 prompts x 4 samples: two prefilled prompt rows with sharing, eight without
    sch_a, sch_b = shared.scheduler.stats, indep.scheduler.stats
    assert sch_a.batches == sch_b.batches  # same jobs ...
    assert shared.scheduler.prefilled_prompts == 2 and indep.scheduler.prefilled_prompts == 8  # ... fewer rows


def test_prefix_sharing_equals_independent_fast(samplers):
    """The same check on the module's sampler (no new compilations): prefix sharing switched off and on."""
    _, cont = samplers
    prompts = _prompts([50, 6], seed=2)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=5, n=3, logprobs=True)
    out, prefilled = {}, {}
    try:
        for sharing in (False, True):
            cont.prefix_sharing = sharing
            before = cont.scheduler.prefilled_prompts
            out[sharing] = cont.generate(prompts, params)
            prefilled[sharing] = cont.scheduler.prefilled_prompts - before
    finally:
        cont.prefix_sharing = True
    assert [o.token_ids for o in out[True]] == [o.token_ids for o in out[False]]
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in out[True]]),
                               np.concatenate([o.logprobs for o in out[False]]), atol=1e-5)
    assert len({tuple(o.token_ids) for o in out[True][:3]}) > 1  # the samples of one prompt differ
    assert prefilled == {True: 2, False: 6}  # 2 prompts x 3 samples: one prefill row per prompt when shared


def test_short_rows_do_not_wait_for_a_long_prompt(model):
    """A long prompt is prefilled chunk by chunk while short rows decode; they finish before it starts."""
    s = Sampler(model, None, **KW)
    long_p, shorts = _prompts([120])[0], _prompts([4, 6, 5], seed=1)
    finished_round = {}

    def track(name):
        def on_update(row, delta, final):
            if final:
                finished_round[name] = s.scheduler.rounds
        return on_update

    rows = [Row(long_p, SamplingParams(max_new_tokens=8), seed=0, on_update=track("long"))]
    rows += [Row(p, SamplingParams(max_new_tokens=4), seed=0, prompt_index=i + 1, on_update=track(f"s{i}"))
             for i, p in enumerate(shorts)]
    s.submit(rows)  # the long prompt first: arrival order must not matter
    first_token_round = None
    while s.step():
        if first_token_round is None and rows[0].token_ids:
            first_token_round = s.scheduler.rounds
    # 128 prompt slots / 32-token chunks with a 64-token budget per round: the long row gets its
    # first token in round >= 2, while the short ones (4 new tokens = 1 prefill + 1 decode chunk) are done by round 2.
    assert first_token_round >= 2
    assert all(finished_round[f"s{i}"] <= first_token_round for i in range(3)), (finished_round, first_token_round)
    assert all(r.finished for r in rows) and len(rows[0].token_ids) == 8
    ref = Sampler(model, None, continuous=False, **KW).generate([long_p] + shorts, SamplingParams(max_new_tokens=8))
    assert rows[0].token_ids == ref[0].token_ids
    assert [r.token_ids for r in rows[1:]] == [o.token_ids[:4] for o in ref[1:]]


def test_compilations_bounded(samplers):
    _, cont = samplers
    rng = np.random.RandomState(4)
    lengths = [5, 20, 40, 90, 99] + list(rng.randint(1, 100, size=19))  # every prompt bucket of 1..99 tokens
    cont.generate(_prompts(lengths, seed=5), SamplingParams(max_new_tokens=5, temperature=0.7, seed=1))
    after = cont.trace_counts
    cont.generate(_prompts(rng.randint(1, 100, size=30), seed=6), SamplingParams(max_new_tokens=9))
    new = {k: v - after.get(k, 0) for k, v in cont.trace_counts.items() if v != after.get(k, 0)}
    assert not new, new  # same buckets: nothing recompiles, whatever the mix of lengths
    assert cont.trace_counts["decode_lane"] <= 2  # one lane shape (x stop-id widths 4 and 8 of the first test)


@pytest.mark.slow
def test_lanes_sized_to_demand_warmup_covers_every_shape(model):
    """A lone long request decodes at lane batch 1; a short one admitted next to it grows the lane to the
    next bucket, finishes first, and the lane shrinks back. The warm-up compiled every shape this
    needs, and the outputs equal the batch-level engine's."""
    kw = dict(eos_token_ids=[], max_batch_size=4, batch_buckets=(1, 2, 4), max_model_len=128, prompt_buckets=(16, 64),
              new_token_buckets=(32,), cache_buckets=(128,), prefill_chunk=32, decode_chunk=4, prefill_budget=32)
    s = Sampler(model, None, **kw)
    assert s.scheduler.buckets == (1, 4)  # thinned to steps of 4x
    compiled = s.scheduler.warmup([(10, 8), (60, 24)])
    # one lane (128 slots) x batches 1, 4: decode 2, resize 1->4 and 4->1; prompt buckets 16, 64 x job
    # batches 1, 4: prefill 4; admit (lane 1, job 1), (4, 1), (4, 4) per prompt bucket: 6
    assert compiled == {"decode_lane": 2, "resize": 2, "prefill_chunk": 4, "admit": 6}, compiled
    counts = dict(s.trace_counts)
    long_p, short_p = _prompts([60])[0], _prompts([10], seed=1)[0]
    done = {}

    def track(name):
        def on_update(row, delta, final):
            if final:
                done[name] = s.scheduler.rounds
        return on_update

    long_row = Row(long_p, SamplingParams(max_new_tokens=24), seed=0, on_update=track("long"))
    short_row = Row(short_p, SamplingParams(max_new_tokens=8), seed=0, prompt_index=1, on_update=track("short"))
    batches = []
    s.submit([long_row])
    while not long_row.token_ids or len(long_row.token_ids) < 5:  # the long row is decoding, alone
        s.step()
        batches.append(s.scheduler.lanes[128].batch)
    assert set(batches) == {1}
    s.submit([short_row])
    while s.step():
        batches.append(s.scheduler.lanes[128].batch if 128 in s.scheduler.lanes else 0)
    assert 4 in batches and batches[-2:] == [1, 0], batches  # grew for the short row, shrank after it
    assert done["short"] < done["long"], done
    assert dict(s.trace_counts) == counts  # nothing compiled after the warm-up
    ref = Sampler(model, None, continuous=False, **kw).generate([long_p, short_p], SamplingParams(max_new_tokens=24))
    assert long_row.token_ids == ref[0].token_ids and short_row.token_ids == ref[1].token_ids[:8]
