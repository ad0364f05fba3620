"""OpenAI-compatible server: the official client against our server on 127.0.0.1 (tiny real-vocab model)."""
import concurrent.futures as cf
import http.client
import json

import pytest

openai = pytest.importorskip("openai")

from iopo_jax.sampling import Sampler, SamplingParams
from iopo_jax.sampling.serve import OpenAIServer
from iopo_jax.tools.make_tiny_model import make_tiny_model

KEY = "test-key-123"
MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def sampler(tmp_path_factory, qwen_tokenizer_dir):
    d = make_tiny_model(str(tmp_path_factory.mktemp("tiny_serve")), "qwen2", tokenizer_dir=qwen_tokenizer_dir)
    return Sampler.from_pretrained(d, max_batch_size=32, max_model_len=128, prompt_buckets=(64,),
                                   new_token_buckets=(16,), batch_buckets=(8, 32), decode_chunk=4)


@pytest.fixture(scope="module")
def server(sampler):
    srv = OpenAIServer(sampler, model_name=MODEL, host="127.0.0.1", port=0, api_key=KEY, batch_wait_s=0.02)
    srv.start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _chat(text):
    return [{"role": "user", "content": text}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_matches_direct_greedy(client, sampler):
    r = client.chat.completions.create(model=MODEL, messages=_chat("Name three colours."), max_tokens=12,
                                       temperature=0)
    ref = sampler.chat([_chat("Name three colours.")], SamplingParams(max_new_tokens=12))[0]
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.num_prompt_tokens and r.usage.completion_tokens == ref.num_tokens
    assert r.model == MODEL and r.object == "chat.completion"


def test_completions_n_and_seed(client, sampler):
    kw = dict(model=MODEL, prompt=["Once upon a time", "The capital of France"], max_tokens=8, temperature=1.0,
              top_p=0.9, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1
    ref = sampler.generate(["Once upon a time", "The capital of France"],
                           SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=1234))
    assert texts == [c.text for c in ref]  # same draws as the Python API, whatever the batch
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != texts


def test_streaming_chat_and_completions(client):
    msgs = _chat("Tell me a story.")
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=14, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=14, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, finish, usage, n_chunks = [], None, None, 0
    for ch in stream:
        n_chunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens
    assert n_chunks >= 4  # role chunk, several text chunks (decode_chunk=4), final chunk
    st = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0, n=2, stream=True)
    texts = {0: "", 1: ""}
    for ch in st:
        for c in ch.choices:
            texts[c.index] += c.text
    ref = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    assert texts[0] == texts[1] == ref.choices[0].text


def test_stop_strings(client):
    msgs = _chat("Count with me")
    free = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = text[:text.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stop=[stop, "\x01"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    parts = []
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stop=stop,
                                             stream=True):
        parts += [c.delta.content or "" for c in ch.choices]
    assert "".join(parts) == cut


def test_32_concurrent_clients(server, client, sampler):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(32)]
    before = server.engine.batches

    def ask(p):
        c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)
        return c.chat.completions.create(model=MODEL, messages=_chat(p), max_tokens=8, temperature=0)

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    ref = sampler.chat([_chat(p) for p in prompts], SamplingParams(max_new_tokens=8))
    assert [a.choices[0].message.content for a in answers] == [r.text for r in ref]
    assert server.engine.batches - before < 32  # requests were batched together


def _raw(server, method, path, body=None, headers=None, raw=None):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    h.update(headers or {})
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def _ok_chat(**kw):
    return {"model": MODEL, "messages": _chat("hi"), "max_tokens": 4, **kw}


MALFORMED = [
    ("bad json", "POST", "/v1/chat/completions", None, b"{not json", {}, 400),
    ("body not an object", "POST", "/v1/chat/completions", [1, 2], None, {}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {**_ok_chat(), "model": "gpt-9"}, None, {}, 404),
    ("missing model", "POST", "/v1/chat/completions", {"messages": _chat("hi")}, None, {}, 400),
    ("missing messages", "POST", "/v1/chat/completions", {"model": MODEL}, None, {}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", _ok_chat(messages="hi"), None, {}, 400),
    ("message without content", "POST", "/v1/chat/completions", _ok_chat(messages=[{"role": "user"}]), None, {}, 400),
    ("bad role", "POST", "/v1/chat/completions", _ok_chat(messages=[{"role": "robot", "content": "x"}]), None, {},
     400),
    ("image part", "POST", "/v1/chat/completions",
     _ok_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None, {},
     400),
    ("negative max_tokens", "POST", "/v1/chat/completions", _ok_chat(max_tokens=-5), None, {}, 400),
    ("zero max_tokens", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None, {}, 400),
    ("prompt longer than the context", "POST", "/v1/chat/completions", _ok_chat(messages=_chat("word " * 300)), None,
     {}, 400),
    ("max_tokens beyond the context", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 500},
     None, {}, 400),
    ("temperature wrong type", "POST", "/v1/chat/completions", _ok_chat(temperature="hot"), None, {}, 400),
    ("temperature out of range", "POST", "/v1/chat/completions", _ok_chat(temperature=3), None, {}, 400),
    ("top_p zero", "POST", "/v1/chat/completions", _ok_chat(top_p=0), None, {}, 400),
    ("n as string", "POST", "/v1/chat/completions", _ok_chat(n="2"), None, {}, 400),
    ("n too large", "POST", "/v1/chat/completions", _ok_chat(n=1000), None, {}, 400),
    ("max_tokens as float", "POST", "/v1/chat/completions", _ok_chat(max_tokens=3.5), None, {}, 400),
    ("stop wrong type", "POST", "/v1/chat/completions", _ok_chat(stop=5), None, {}, 400),
    ("seed wrong type", "POST", "/v1/chat/completions", _ok_chat(seed="x"), None, {}, 400),
    ("stream wrong type", "POST", "/v1/chat/completions", _ok_chat(stream="yes"), None, {}, 400),
    ("unsupported penalty", "POST", "/v1/chat/completions", _ok_chat(presence_penalty=1.0), None, {}, 400),
    ("missing prompt", "POST", "/v1/completions", {"model": MODEL}, None, {}, 400),
    ("prompt wrong type", "POST", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, None, {}, 400),
    ("token id outside the vocabulary", "POST", "/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, None, {},
     400),
    ("empty prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": ""}, None, {}, 400),
    ("unknown endpoint", "POST", "/v1/embeddings", {"model": MODEL}, None, {}, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, None, {}, 405),
    ("missing api key", "POST", "/v1/chat/completions", _ok_chat(), None, {"Authorization": ""}, 401),
    ("wrong api key", "GET", "/v1/models", None, None, {"Authorization": "Bearer nope"}, 401),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_4xx(server, case):
    name, method, path, body, raw, headers, status = case
    got, payload = _raw(server, method, path, body, headers, raw)
    assert got == status, (name, payload)
    err = json.loads(payload)["error"]
    assert isinstance(err["message"], str) and err["message"], err


def test_server_keeps_serving_after_errors(server, client):
    for _, method, path, body, raw, headers, status in MALFORMED:
        assert _raw(server, method, path, body, headers, raw)[0] == status
    r = client.chat.completions.create(model=MODEL, messages=_chat("still there?"), max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    status, payload = _raw(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and json.loads(payload) == {"status": "ok"}


def test_openai_client_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=_chat("x"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=_chat("x"), max_tokens=-1)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_logprobs_and_echo(client, sampler):
    msgs = _chat("Say something.")
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True)
    ref = sampler.chat([msgs], SamplingParams(max_new_tokens=6, logprobs=True))[0]
    got = [c.logprob for c in r.choices[0].logprobs.content]
    assert got == pytest.approx(ref.logprobs, abs=1e-5) and len(got) == r.usage.completion_tokens
    assert "".join(c.token for c in r.choices[0].logprobs.content).startswith(ref.text)
    c = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, temperature=0, echo=True, logprobs=None)
    plain = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, temperature=0)
    assert c.choices[0].text == "Echo me" + plain.choices[0].text
    lp = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=4, temperature=0, logprobs=0)
    assert len(lp.choices[0].logprobs.token_logprobs) == lp.usage.completion_tokens
    assert all(x <= 0 for x in lp.choices[0].logprobs.token_logprobs)


def test_body_limits(server):
    deep = b'{"model": "tiny-qwen2", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, payload = _raw(server, "POST", "/v1/chat/completions", raw=deep)
    assert status == 400 and "nested" in json.loads(payload)["error"]["message"]
    ok_depth = json.dumps({**_ok_chat(), "metadata": {"a": [[[["x"]]]]}, "stop": ["[[[", "{{{"]}).encode()
    assert _raw(server, "POST", "/v1/chat/completions", raw=ok_depth)[0] == 200  # brackets in strings do not count
    saved = server.max_body_bytes
    server.max_body_bytes = 1000
    try:
        status, payload = _raw(server, "POST", "/v1/chat/completions", _ok_chat(messages=_chat("x" * 2000)))
        assert status == 413 and json.loads(payload)["error"]["message"]
    finally:
        server.max_body_bytes = saved
    assert _raw(server, "GET", "/v1/models")[0] == 200


def test_parse_warmup_flag():
    from iopo_jax.sampling.serve import parse_warmup

    assert parse_warmup(["200:256", "2000:512"]) == [(200, 256), (2000, 512)]
    for bad in (["200"], ["a:5"], ["0:5"], ["5:"]):
        with pytest.raises(ValueError, match="--warmup"):
            parse_warmup(bad)
