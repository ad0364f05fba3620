"""Tests of iopo_jax/chat_client.py (OpenAI-compatible client) against the local fake judge."""
import json
import logging
import os
import threading
import time

import pytest

from iopo_jax import io_utils
from iopo_jax import chat_client
from tests.fake_judge import FakeJudge

MSG = [{"role": "user", "content": "hello"}]


def _cfg(fj, tmp_path=None, **kw):
    base = dict(base_url=fj.base_url, model="judge-m", timeout_s=0.5, backoff_base_s=0.01,
                backoff_max_s=0.05, max_retries=4, concurrency=4)
    if tmp_path is not None:
        base["store_path"] = str(tmp_path / "store.jsonl")
    base.update(kw)
    return chat_client.ClientConfig(**base)


def test_complete_store_and_cache(tmp_path):
    with FakeJudge(reply_fn=lambda b: {"text": "verdict for " + b["messages"][-1]["content"],
                                       "prompt_tokens": 100, "completion_tokens": 20}) as fj:
        cfg = _cfg(fj, tmp_path, price_prompt_per_1k=0.5, price_completion_per_1k=2.0, temperature=0.0,
                   top_p=0.8, max_tokens=64)
        with chat_client.ChatClient(cfg) as c:
            r = c.complete(MSG)
            assert r.text == "verdict for hello" and not r.cached and r.attempts == 1
            r2 = c.complete(MSG)
            assert r2.cached and r2.text == r.text
            u = c.usage()
        assert u["requests_sent"] == 1 and u["cache_hits"] == 1
        assert u["prompt_tokens"] == 100 and u["completion_tokens"] == 20
        assert u["cost"] == pytest.approx(0.1 * 0.5 + 0.02 * 2.0)
        # The request carried model and sampling params.
        body = fj.requests[0].body
        assert body["model"] == "judge-m" and body["temperature"] == 0.0 and body["top_p"] == 0.8
        assert body["max_tokens"] == 64
        # A new client on the same store re-sends nothing.
        with chat_client.ChatClient(cfg) as c2:
            r3 = c2.complete(MSG)
            assert r3.cached and r3.text == "verdict for hello"
            assert c2.usage()["requests_sent"] == 0 and c2.usage()["store_prompt_tokens"] == 100
        assert len(fj.requests) == 1
        # A different attempt index is a different key (fresh answer).
        with chat_client.ChatClient(cfg) as c3:
            assert not c3.complete(MSG, attempt=1).cached
        assert len(fj.requests) == 2
    recs = io_utils.read_jsonl(str(tmp_path / "store.jsonl"))
    assert len(recs) == 2 and recs[0]["key"] == chat_client.request_key("judge-m", MSG, cfg and c.params)


def test_key_depends_on_model_messages_params():
    k = chat_client.request_key("m", MSG, {"temperature": 0.0})
    assert k != chat_client.request_key("m2", MSG, {"temperature": 0.0})
    assert k != chat_client.request_key("m", [{"role": "user", "content": "hellO"}], {"temperature": 0.0})
    assert k != chat_client.request_key("m", MSG, {"temperature": 0.1})
    assert k != chat_client.request_key("m", MSG, {"temperature": 0.0}, attempt=1)
    assert k == chat_client.request_key("m", MSG, {"temperature": 0.0}, attempt=0)


@pytest.mark.parametrize("fault", ["timeout", "429", "500", "503", "bad_json", "drop"])
def test_retry_on_fault(fault, tmp_path, caplog):
    with FakeJudge(reply_fn=lambda b: "ok", faults={1: fault, 2: fault}, timeout_sleep_s=1.0,
                   retry_after_s=0.3) as fj:
        with chat_client.ChatClient(_cfg(fj, tmp_path)) as c:
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="iopo_jax.chat_client"):
                r = c.complete(MSG)
            dt = time.monotonic() - t0
            assert r.text == "ok" and r.attempts == 3
            assert c.usage()["retries"] == 2 and c.usage()["requests_sent"] == 3
        assert len(fj.requests) == 3
    retry_lines = [m for m in caplog.messages if "retry" in m]
    assert len(retry_lines) == 2, caplog.messages
    if fault == "429":
        assert "Retry-After" in retry_lines[0]
        assert dt >= 2 * 0.3  # Retry-After honoured (far above the 0.01-0.05 s backoff)


def test_retries_exhausted_and_non_retryable(tmp_path, caplog):
    with FakeJudge(reply_fn=lambda b: "ok", faults=lambda n, b: "500") as fj:
        with chat_client.ChatClient(_cfg(fj, tmp_path, max_retries=2)) as c:
            with pytest.raises(chat_client.ChatError, match="failed after 3 tries"):
                c.complete(MSG)
        assert len(fj.requests) == 3
    with FakeJudge(reply_fn=lambda b: "ok", api_key="right") as fj:
        os.environ["IOPO_TEST_KEY_WRONG"] = "wrong-key"
        try:
            with chat_client.ChatClient(_cfg(fj, tmp_path, api_key_env="IOPO_TEST_KEY_WRONG")) as c:
                with pytest.raises(chat_client.ChatError, match="HTTP 401"):
                    c.complete(MSG)
        finally:
            del os.environ["IOPO_TEST_KEY_WRONG"]
        assert len(fj.requests) == 1  # 4xx is not retried


def test_budget(tmp_path):
    with FakeJudge(reply_fn=lambda b: "ok", faults={1: "500", 2: "500"}) as fj:
        with chat_client.ChatClient(_cfg(fj, tmp_path, request_budget=3)) as c:
            assert c.complete(MSG).text == "ok"  # 3 requests
            with pytest.raises(chat_client.BudgetExhaustedError):
                c.complete([{"role": "user", "content": "other"}])
            assert c.complete(MSG).cached  # cache hits cost no budget
        assert len(fj.requests) == 3


def test_api_key_sent_but_never_logged_or_stored(tmp_path, caplog, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("IOPO_TEST_JUDGE_KEY", secret)
    with FakeJudge(reply_fn=lambda b: "ok", api_key=secret, echo_headers_in_errors=True,
                   faults={1: "500", 3: "500"}) as fj:
        cfg = _cfg(fj, tmp_path, api_key_env="IOPO_TEST_JUDGE_KEY", max_retries=1)
        with caplog.at_level(logging.DEBUG):
            with chat_client.ChatClient(cfg) as c:
                assert c.complete(MSG).text == "ok"
                with pytest.raises(chat_client.ChatError) as ei:
                    # Request 3 fails with a body echoing the Authorization header, request 4 too (401 below
                    # is not reached: the key is right); make both fail by exhausting retries.
                    fj.faults = lambda n, b: "500"
                    c.complete([{"role": "user", "content": "x"}])
        assert fj.requests[0].headers["Authorization"] == f"Bearer {secret}"
        assert secret not in str(ei.value) and "***" in str(ei.value)
    assert any("request_headers" in m for m in caplog.messages)  # the echo did reach the log, redacted
    assert not any(secret in m for m in caplog.messages)
    assert secret not in (tmp_path / "store.jsonl").read_text()
    assert secret not in json.dumps(cfg.__dict__)


def test_missing_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("IOPO_TEST_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="IOPO_TEST_ABSENT_KEY is not set"):
        chat_client.ChatClient(chat_client.ClientConfig(base_url="http://127.0.0.1:1/v1", model="m",
                                                    api_key_env="IOPO_TEST_ABSENT_KEY"))


def test_bounded_concurrency(tmp_path):
    with FakeJudge(reply_fn=lambda b: "ok", latency_s=0.15) as fj:
        with chat_client.ChatClient(_cfg(fj, None, concurrency=3)) as c:
            threads = [threading.Thread(target=c.complete, args=([{"role": "user", "content": str(i)}],))
                       for i in range(9)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.monotonic() - t0
        assert fj.max_inflight == 3
        assert len(fj.requests) == 9 and dt >= 3 * 0.15


def test_retry_after_parsing():
    assert chat_client.parse_retry_after("2") == 2.0
    assert chat_client.parse_retry_after("0.5") == 0.5
    assert chat_client.parse_retry_after(None) is None
    assert chat_client.parse_retry_after("soon") is None
    import email.utils
    v = chat_client.parse_retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert 25 <= v <= 31


def test_store_survives_torn_line(tmp_path):
    path = tmp_path / "store.jsonl"
    with FakeJudge(reply_fn=lambda b: "ok") as fj:
        cfg = _cfg(fj, tmp_path)
        with chat_client.ChatClient(cfg) as c:
            c.complete(MSG)
        with open(path, "ab") as f:
            f.write(b'{"key": "abc", "text": "tor')  # a write cut by SIGKILL
        with chat_client.ChatClient(cfg) as c:
            assert c.complete(MSG).cached
            c.complete([{"role": "user", "content": "second"}])
    recs = io_utils.read_jsonl(str(path))
    assert len(recs) == 2 and all("key" in r for r in recs)


def test_abort_stops_a_retry_loop_at_once():
    with FakeJudge(reply_fn=lambda b: "ok", faults=lambda n, b: "503") as fj:
        c = chat_client.ChatClient(_cfg(fj, None, backoff_base_s=30.0, backoff_max_s=30.0, max_retries=5))
        t = threading.Timer(0.3, c.abort)
        t.start()
        t0 = time.monotonic()
        with pytest.raises(chat_client.ChatError, match="aborted"):
            c.complete(MSG)
        assert time.monotonic() - t0 < 5
        assert len(fj.requests) == 1
