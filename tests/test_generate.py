"""Batch generation CLI: input validation, resumable output, per-record seeds, --lora, the real command line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iopo_jax.sampling.generate import GenerateArgs, InputError, read_done_ids, read_input, record_seed, run
from iopo_jax.models import LoRAConfig, load_model
from iopo_jax.sampling import Sampler, SamplingParams
from iopo_jax.tools.make_tiny_model import make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = [
    {"id": "a", "prompt": "Write one word."},
    {"id": 2, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]},
    {"id": "c", "prompt": "List the planets of the solar system in order, please."},
    {"id": "d", "prompt": "?"},
    {"id": "e", "messages": [{"role": "user", "content": "Translate 'cat' to French."}]},
    {"id": "f", "prompt": "Why is the sky blue? Answer in one sentence."},
]


def _write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny real-vocab Qwen2 base plus a PEFT adapter with non-zero factors, and a sampler over both."""
    from iopo_jax.models.lora import export_peft

    base = make_tiny_model(str(tmp_path_factory.mktemp("tiny_gen")), "qwen2", tokenizer_dir=qwen_tokenizer_dir)
    model, _ = load_model(base, lora=LoRAConfig(rank=4, alpha=8.0))
    g, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(1), 200))
    lora = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.5, lora)
    adapter = export_peft(nnx.merge(g, lora, rest), str(tmp_path_factory.mktemp("adapter")))
    sampler = Sampler.from_pretrained(base, lora=adapter, max_batch_size=4, max_model_len=128,
                                      prompt_buckets=(32, 64), new_token_buckets=(16,), batch_buckets=(4,))
    return base, adapter, sampler


def test_read_input_errors(tmp_path):
    cases = [
        ('{"id": 1, "prompt": "x"}\n{bad', r":2: invalid JSON"),
        ('{"prompt": "x"}', r":1: field 'id'"),
        ('{"id": 1, "prompt": "x"}\n\n{"id": "1", "prompt": "y"}', r":3: duplicate id '1' \(first on line 1\)"),
        ('{"id": 1, "prompt": "x", "messages": []}', r":1: give exactly one of the fields 'prompt' and 'messages'"),
        ('{"id": 1}', r":1: give exactly one"),
        ('{"id": 1, "prompt": 5}', r":1: field 'prompt' must be a string"),
        ('{"id": 1, "messages": [{"role": "user"}]}', r":1: field 'messages\[0\]'"),
        ('[1, 2]', r":1: expected a JSON object"),
    ]
    for k, (text, pattern) in enumerate(cases):
        p = tmp_path / f"in{k}.jsonl"
        p.write_text(text + "\n")
        with pytest.raises(InputError, match=pattern):
            read_input(str(p))
    with pytest.raises(InputError, match="not found"):
        read_input(str(tmp_path / "missing.jsonl"))
    recs = read_input(_write_jsonl(tmp_path / "ok.jsonl", RECORDS))
    assert [r["id"] for r in recs] == ["a", "2", "c", "d", "e", "f"] and recs[1]["line"] == 2


def test_parse_mesh():
    from iopo_jax.sampling.generate import parse_mesh

    assert dict(parse_mesh("fsdp=4,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(parse_mesh("").shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    for bad in ("fsdp", "fsdp=x", "fsdp=3"):
        with pytest.raises(ValueError):
            parse_mesh(bad)


def test_read_done_ids_repairs_only_a_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": "a", "response": "x"}\n{"id": "b", "resp')
    assert read_done_ids(str(p)) == {"a"}
    assert p.read_text() == '{"id": "a", "response": "x"}\n'
    p.write_text('{"id": "a"}\n{"id": "b"}')  # complete record without its newline: kept
    assert read_done_ids(str(p)) == {"a", "b"} and p.read_text().endswith("}\n")
    p.write_text('{"id": "a"}\ngarbage\n{"id": "b"}\n')
    with pytest.raises(InputError, match=r"out.jsonl:2: not a valid output record"):
        read_done_ids(str(p))


def test_run_resume_reproduces_seeded_samples(tmp_path, lora_setup):
    base, _, sampler = lora_setup
    inp = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    kw = dict(model_dir=base, input=inp, batch_size=4, max_new_tokens=6, temperature=0.9, top_p=0.95, seed=3,
              save_token_ids=True, logprobs=True, progress=False)
    full = str(tmp_path / "full.jsonl")
    s = run(GenerateArgs(output=full, **kw), sampler=sampler)
    assert s["generated"] == 6 and s["skipped"] == 0
    ref = {r["id"]: r for r in _read_jsonl(full)}
    assert set(ref) == {"a", "2", "c", "d", "e", "f"}
    for r in ref.values():
        assert isinstance(r["response"], str) and r["finish_reason"] in ("stop", "length")
        assert r["num_tokens"] == len(r["token_ids"]) == len(r["logprobs"]) <= 6 and r["num_prompt_tokens"] > 0
    # the draws are those of the Python API with the per-record seeds
    recs = read_input(inp)
    ids = [sampler.encode([{"role": "user", "content": r["prompt"]}] if "prompt" in r else r["messages"])
           for r in recs]
    direct = sampler.generate(ids, SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.95),
                              seeds=[record_seed(3, r["id"]) for r in recs])
    assert [ref[r["id"]]["token_ids"] for r in recs] == [c.token_ids for c in direct]
    # crash after two records plus half a line; the rerun completes the file with the same samples
    lines = open(full, encoding="utf-8").read().splitlines(keepends=True)
    part = str(tmp_path / "part.jsonl")
    with open(part, "w", encoding="utf-8") as f:
        f.write(lines[0] + lines[1] + lines[2][:15])
    s = run(GenerateArgs(output=part, **kw), sampler=sampler)
    assert s["skipped"] == 2 and s["generated"] == 4
    got = _read_jsonl(part)
    assert len(got) == 6 and {r["id"]: r for r in got} == ref
    assert run(GenerateArgs(output=part, **kw), sampler=sampler)["generated"] == 0


def test_run_n_samples_and_greedy(tmp_path, lora_setup):
    base, _, sampler = lora_setup
    inp = _write_jsonl(tmp_path / "in.jsonl", RECORDS[:3])
    out = str(tmp_path / "out.jsonl")
    run(GenerateArgs(model_dir=base, input=inp, output=out, batch_size=4, max_new_tokens=5, n=2, progress=False),
        sampler=sampler)
    got = {r["id"]: r for r in _read_jsonl(out)}
    ref = sampler.chat([[{"role": "user", "content": "Write one word."}]], SamplingParams(max_new_tokens=5))[0]
    assert got["a"]["responses"] == [ref.text, ref.text] and len(got["a"]["finish_reasons"]) == 2
    assert got["a"]["num_tokens"] == 2 * ref.num_tokens


def test_too_long_prompt_fails_before_generating(tmp_path, lora_setup):
    base, _, sampler = lora_setup
    inp = _write_jsonl(tmp_path / "in.jsonl", [RECORDS[0], {"id": "long", "prompt": "word " * 200}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=r"in.jsonl:2: .*context length.*--max_model_len"):
        run(GenerateArgs(model_dir=base, input=inp, output=str(out), max_new_tokens=5, progress=False),
            sampler=sampler)
    assert not out.exists() or out.read_text() == ""


def test_lora_changes_the_model(lora_setup):
    """The adapter is really applied: the LoRA sampler's greedy tokens are the arg-max of the LoRA model
    and not of the base model."""
    base, adapter, sampler = lora_setup
    prompt = sampler.encode([{"role": "user", "content": "Hello there, how are you?"}])
    out = sampler.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    seq = jnp.asarray([prompt + out.token_ids])
    pos = slice(len(prompt) - 1, len(prompt) - 1 + len(out.token_ids))

    def argmax(model):
        g, st = nnx.split(model)
        f = jax.jit(lambda st, s: jnp.argmax(nnx.merge(g, st).logits(nnx.merge(g, st)(s)[0]), -1))
        return np.asarray(f(st, seq))[0, pos].tolist()

    from iopo_jax.models.lora import load_model_with_adapter

    assert argmax(load_model_with_adapter(base, adapter)[0]) == out.token_ids
    assert argmax(load_model(base)[0]) != out.token_ids


def test_real_command_line_with_lora(tmp_path, lora_setup):
    base, adapter, sampler = lora_setup
    inp = _write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "iopo_jax.sampling.generate", f"--model_dir={base}", f"--lora={adapter}", f"--input={inp}",
           f"--output={out}", "--max_new_tokens=6", "--batch_size=4", "--max_model_len=128", "--noprogress"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["generated"] == 2
    got = {r["id"]: r["response"] for r in _read_jsonl(out)}
    # the command line's default --scan_layers=auto unrolls the layers on CPU; the fixture's sampler scans them,
    # so the equality below holds across the two layer loops
    assert sampler.engine.scan_layers
    ref = sampler.chat([[{"role": "user", "content": "Write one word."}], RECORDS[1]["messages"]],
                       SamplingParams(max_new_tokens=6))
    assert got == {"a": ref[0].text, "2": ref[1].text}
    bad = subprocess.run(cmd[:4] + [f"--input={tmp_path / 'nope.jsonl'}", f"--output={out}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nope.jsonl: input file not found" in bad.stderr
    bad = subprocess.run(cmd + ["--scan_layers=sometimes"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "scan_layers" in bad.stderr
    helptext = subprocess.run([sys.executable, "-m", "iopo_jax.sampling.generate", "--helpfull"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120).stdout
    for flag in ("--model_dir", "--input", "--output", "--lora", "--temperature", "--top_p", "--top_k", "--seed",
                 "--stop", "--max_new_tokens", "--batch_size", "--scan_layers"):
        assert flag in helptext


@pytest.mark.slow
def test_batching_flag_static_equals_continuous(tmp_path, lora_setup, monkeypatch):
    """``--batching=static`` builds the batch-level engine; greedy outputs equal continuous batching's."""
    base = lora_setup[0]
    inp = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    built = []
    orig = Sampler.from_pretrained.__func__

    def spy(cls, *a, **kw):
        s = orig(cls, *a, **kw)
        built.append(s.continuous)
        return s

    monkeypatch.setattr(Sampler, "from_pretrained", classmethod(spy))
    outs = {}
    for mode in ("static", "continuous"):
        out = str(tmp_path / f"{mode}.jsonl")
        s = run(GenerateArgs(model_dir=base, input=inp, output=out, batch_size=4, max_new_tokens=6,
                             max_model_len=128, progress=False, batching=mode))
        assert s["generated"] == len(RECORDS)
        outs[mode] = {r["id"]: r["response"] for r in _read_jsonl(out)}
    assert built == [False, True]
    assert outs["static"] == outs["continuous"]
    assert len(set(outs["static"].values())) > 1


def test_continuous_run_writes_records_as_they_finish(tmp_path, lora_setup):
    """With continuous batching a record is on disk as soon as its rows are done, while others still run."""
    base, _, sampler = lora_setup
    recs = [{"id": "short", "prompt": "?"}, {"id": "long", "prompt": "Tell me a story about " + "a cat " * 8}]
    inp = _write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    seen = []
    step, budget = sampler.step, sampler.prefill_budget

    def spy():  # before each round: records on disk, and whether rows are still waiting or running
        seen.append((len(out.read_text().splitlines()) if out.exists() else 0, sampler.scheduler.idle()))
        return step()

    sampler.step, sampler.prefill_budget = spy, 1  # one prefill job per round: the long prompt comes second
    try:
        run(GenerateArgs(model_dir=base, input=inp, output=str(out), batch_size=4, max_new_tokens=6,
                         progress=False), sampler=sampler)
    finally:
        sampler.step, sampler.prefill_budget = step, budget
    assert (1, False) in seen, seen  # one record written while the other was still generating
    assert {r["id"] for r in _read_jsonl(out)} == {"short", "long"}
