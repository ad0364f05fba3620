"""evaluation.generate.jax_sampler_stream: continuous batching with a bounded window, answers as they finish."""
from evaluation import generate


def test_stream_answers_equal_sampler_generate_whatever_the_window(tiny_model_dir, monkeypatch):
    from iopo_jax.sampling import SamplingParams

    convs = [[{"role": "user", "content": f"Write {k} words about the sea{'!' * k}"}] for k in range(5)]
    ids = [f"k{k}#0" for k in range(5)]
    kw = dict(temperature=0.8, top_p=1.0, max_new_tokens=6, seed=3)
    sampler = generate._sampler_for(tiny_model_dir, "")
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


def test_scan_layers_setting_picks_the_layer_loop_and_keeps_the_answers(tiny_model_dir):
    """config.generation.scan_layers: "auto" is the unrolled loop on CPU; true / false give the same answers."""
    import pytest
    from evaluation import config_defaults, driver
    from iopo_jax.sampling.sampler import resolve_scan_layers

    assert resolve_scan_layers("auto") is False  # this test runs on CPU
    assert resolve_scan_layers("TRUE") is True and resolve_scan_layers(False) is False
    with pytest.raises(ValueError, match="true, false or auto"):
        resolve_scan_layers("sometimes")
    reqs = [driver.GenRequest(f"u{k}#0", [{"role": "user", "content": f"Name {k} colours"}]) for k in range(3)]
    answers = {}
    for scan in (True, False):
        gen = generate.JaxSamplerGenerator(tiny_model_dir, temperature=0.0, top_p=1.0, max_new_tokens=5,
                                           batch_size=2, scan_layers=scan)
        answers[scan] = {r.id: r.text for r in gen.generate(reqs)}
        assert generate._sampler_for(tiny_model_dir, "", scan).engine.scan_layers is scan
    assert answers[True] == answers[False] and len(answers[True]) == 3
    config = config_defaults.base_config("ifeval")
    config.model_dir = tiny_model_dir
    config.generation.scan_layers = "sometimes"
    with pytest.raises(ValueError, match="config.generation.scan_layers"):
        generate.make_generator(config, "jax", "/tmp")
