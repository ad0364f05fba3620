"""Continuous batching: equal to the batch-level engine, prefix sharing, admission order, bounded compilations."""
import numpy as np
import pytest
from flax import nnx

from iopo_jax.models import ModelConfig, Transformer
from iopo_jax.sampling import Row, Sampler, SamplingParams
from iopo_jax.sampling.continuous import Scheduler

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


# ------------------------------------------------------------------ lane promotion
# Lanes of 24, 48, 96 and 192 slots (lanes from 16 slots on, not 128): a 16-token prompt bucket starts in
# the 24-slot lane and is promoted to 48 and 96 as it writes its 48 tokens; a 64-token bucket goes 96 -> 192.
KW2 = dict(KW, max_model_len=192, new_token_buckets=(48,), cache_buckets=(24, 48, 96, 192))
PROMO_LENGTHS = [3, 10, 20, 40, 5, 60, 9, 11, 2, 33, 14, 100]


class _Letters:
    """Token id -> one letter (decode only): enough for stop strings."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _promoting_sampler(model, **kw):
    """A continuous sampler whose lanes start at 16 slots (its scheduler is made inside the patch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "min_lane_length", 16)
        s = Sampler(model, None, **kw)
        s.scheduler
    return s


@pytest.fixture(scope="module")
def promo(model):
    static, cont = Sampler(model, None, continuous=False, **KW2), _promoting_sampler(model, **KW2)
    assert cont.scheduler.lane_lengths == (24, 48, 96, 192)
    return static, cont


def _toggle(sampler, promotion: bool, fn):
    """``fn()`` with the sampler's lane promotion set to ``promotion`` (restored after)."""
    try:
        sampler.lane_promotion = promotion
        return fn()
    finally:
        sampler.lane_promotion = True


def test_lane_promotion_greedy_equals_batch_level(promo):
    static, cont = promo
    sch = cont.scheduler
    assert sch.lane_path(16, 48) == [24, 48, 96] and sch.lane_path(64, 48) == [96, 192]
    assert sch.lane_path(128, 48) == [192] and sch.lane_path(16, 3) == [24]
    assert _toggle(cont, False, lambda: sch.lane_path(16, 48)) == [96]
    prompts = _prompts(PROMO_LENGTHS, seed=7)
    params = SamplingParams(max_new_tokens=48, logprobs=True)
    before = sch.promotions
    ref, out = static.generate(prompts, params), cont.generate(prompts, params)
    # 7 rows of the 16-token bucket are promoted twice, 4 of the 64-token bucket once, the 100-token one never
    assert sch.promotions - before == 7 * 2 + 4
    assert len({tuple(o.token_ids) for o in ref}) > len(ref) // 2, "degenerate model: outputs should differ"
    for a, b in zip(ref, out):
        assert b.token_ids == a.token_ids, f"prompt {a.index}"
        assert b.finish_reason == a.finish_reason == "length"
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)


def test_lane_promotion_sampled_n2_equals_no_promotion(promo):
    """Seeded samples, 2 per prompt sharing one prefill, stop ids: the same with and without promotion."""
    _, cont = promo
    prompts = _prompts([3, 10, 40, 5], seed=8)  # 8 rows: every lane holds all of its rows at once
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=40, seed=3, n=2,
                            stop_token_ids=(5, 7, 9, 11), logprobs=True)
    out, prefilled, moved = {}, {}, {}
    for promotion in (False, True):
        before, moves = cont.scheduler.prefilled_prompts, cont.scheduler.promotions
        out[promotion] = _toggle(cont, promotion, lambda: cont.generate(prompts, params))
        prefilled[promotion] = cont.scheduler.prefilled_prompts - before
        moved[promotion] = cont.scheduler.promotions - moves
    assert moved[False] == 0 and moved[True] > 0
    assert prefilled == {False: len(prompts), True: len(prompts)}  # the 2 samples of a prompt share its prefill
    for a, b in zip(out[False], out[True]):
        assert (b.index, b.sample_index) == (a.index, a.sample_index)
        assert b.token_ids == a.token_ids, f"prompt {a.index} sample {a.sample_index}"
        assert b.finish_reason == a.finish_reason and b.stop_reason == a.stop_reason
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
    assert len({tuple(o.token_ids) for o in out[True][:2]}) > 1  # the samples of one prompt differ
    assert {o.finish_reason for o in out[True]} == {"stop", "length"}


def test_lane_promotion_stop_string_and_cancel_at_the_lane_end(promo):
    """Rows of the 16-token bucket outgrow the 24-slot lane after their first decode chunk (5 tokens): one
    stopped there by a stop string and one cancelled there are finished, not promoted."""
    _, cont = promo
    sch = cont.scheduler
    prompts = _prompts([4, 6, 8], seed=9)
    try:
        cont.tokenizer = _Letters()
        free = cont.generate(prompts, SamplingParams(max_new_tokens=24))
        stop = free[0].text[3:5]
        assert free[0].text.find(stop) == 3  # the stop string ends at token 5
        cancel_at = 5

        def cancel(row, delta, final):
            if len(row.token_ids) >= cancel_at:
                row.cancelled = True

        rows = [Row(prompts[0], SamplingParams(max_new_tokens=24, stop=(stop,)), seed=0),
                Row(prompts[1], SamplingParams(max_new_tokens=24), seed=0, prompt_index=1, on_update=cancel),
                Row(prompts[2], SamplingParams(max_new_tokens=24), seed=0, prompt_index=2)]
        before = sch.promotions
        cont.run_rows(rows)
    finally:
        cont.tokenizer = None
    assert rows[0].text == free[0].text[:3] and rows[0].stop_reason == stop
    assert rows[0].token_ids == free[0].token_ids[:5]
    assert rows[1].stop_reason == "cancelled" and rows[1].token_ids == free[1].token_ids[:cancel_at]
    assert rows[2].token_ids == free[2].token_ids and rows[2].finish_reason == "length"
    assert sch.promotions - before == 1  # only the third row moved to the 48-slot lane
    assert all(r.finished for r in rows) and sch.idle()


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_lane_promotion_waits_for_a_slot_warmup_covers_every_shape(model, promo):
    """Longer lanes of one slot (max_cache_tokens 96): rows that outgrow the 24-slot lane wait there, sitting
    out its decode chunks, until the 48-slot lane has room; nothing deadlocks, the outputs equal the
    batch-level engine's, and the warm-up compiled every shape this needs (promotions included)."""
    static, _ = promo
    kw = dict(KW2, max_batch_size=4, batch_buckets=(1, 4), max_cache_tokens=96)
    s = _promoting_sampler(model, **kw)
    sch = s.scheduler
    assert [sch.lane_cap(n) for n in (24, 48, 96)] == [4, 1, 1]
    assert sch.lane_path(16, 40) == [24, 48, 96]
    compiled = sch.warmup([(16, 40)])
    # lanes 24 (batches 1, 4), 48 and 96 (batch 1): decode 4, resize 1->4 and 4->1; prompt bucket 16 x job
    # batches 1, 4: prefill 2, admit (lane 1, job 1), (4, 1), (4, 4); promote 24x1 and 24x4 -> 48x1, 48x1 -> 96x1
    assert compiled == {"decode_lane": 4, "resize": 2, "prefill_chunk": 2, "admit": 3, "promote": 3}, compiled
    counts = dict(s.trace_counts)
    prompts = _prompts([3, 9, 14, 5, 12, 7], seed=10)
    rows = [Row(p, SamplingParams(max_new_tokens=40), seed=0, prompt_index=i) for i, p in enumerate(prompts)]
    held = []
    promote = sch._promote_rows

    def spy():
        promote()
        held.append(len(sch._outgrown()))  # rows that could not move this round

    sch._promote_rows = spy
    s.submit(rows)
    for _ in range(500):
        if not s.step():
            break
    else:
        pytest.fail("rows never finished")
    assert max(held) >= 2, held  # rows waited for the one slot of the 48-slot lane
    assert all(r.finished and len(r.token_ids) == 40 for r in rows)
    assert sch.promotions == 2 * len(rows)
    assert dict(s.trace_counts) == counts  # nothing compiled after the warm-up
    ref = static.generate(prompts, SamplingParams(max_new_tokens=40))
    assert [r.token_ids for r in rows] == [o.token_ids for o in ref]


def test_lane_promotion_compilations_bounded(promo):
    """Any mix of lengths in the same buckets: promote compiles once per pair of consecutive lanes."""
    _, cont = promo
    rng = np.random.RandomState(11)
    cont.generate(_prompts([2, 30, 70, 16, 64], seed=12), SamplingParams(max_new_tokens=48))
    after = dict(cont.trace_counts)
    cont.generate(_prompts(rng.randint(1, 100, size=20), seed=13),
                  SamplingParams(max_new_tokens=int(rng.randint(5, 48)), temperature=0.8, seed=2))
    new = {k: v - after.get(k, 0) for k, v in cont.trace_counts.items() if v != after.get(k, 0)}
    assert not new, new
    assert cont.trace_counts["promote"] == 3  # 24 -> 48 -> 96 -> 192, lane batch 8
