"""evaluation.generate.jax_sampler_stream: continuous batching with a bounded window, answers as they finish."""
from evaluation import generate


def test_stream_answers_equal_sampler_generate_whatever_the_window(tiny_model_dir, monkeypatch):
    from iopo_jax.sampling import SamplingParams

    convs = [[{"role": "user", "content": f"Write {k} words about the sea{'!' * k}"}] for k in range(5)]
    ids = [f"k{k}#0" for k in range(5)]
    kw = dict(temperature=0.8, top_p=1.0, max_new_tokens=6, seed=3)
    sampler = generate._cached_sampler(tiny_model_dir, "")
    want = sampler.generate(convs, SamplingParams(**kw), seeds=[generate.unit_seed(3, i) for i in ids])

    submitted, peak = [], [0]
    submit = sampler.submit

    def counting_submit(rows):  # rows in the sampler, not finished, when new ones join
        submitted.extend(rows)
        peak[0] = max(peak[0], sum(not r.finished for r in submitted))
        submit(rows)

    monkeypatch.setattr(sampler, "submit", counting_submit)
    got = {}
    for pos, c in generate.jax_sampler_stream(tiny_model_dir, convs, ids, window=2, **kw):
        got[pos] = c
    assert peak[0] == 2 and len(submitted) == 5 and sorted(got) == list(range(5))
    for k in range(5):
        assert got[k].token_ids == want[k].token_ids and got[k].text == want[k].text
        assert got[k].finish_reason in ("stop", "length") and 1 <= len(got[k].token_ids) <= 6
