"""`python -m iopo_jax.sampling.serve --model_dir=DIR` on the real SmolLM2-135M-Instruct, through the CLI and the OpenAI
client only (plain and streaming chat completions). Slow: the model is fetched (cached) and compiled."""
import os
import re
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server_url(smollm2_dir):
    cmd = [sys.executable, "-m", "iopo_jax.sampling.serve", f"--model_dir={smollm2_dir}", "--port=0", "--max_model_len=512",
           "--served_model_name=smollm2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found, lines = {}, []

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving '.*' on (http://[\d.]+:\d+/v1)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 900
    while "url" not in found and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    if "url" not in found:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines[-30:]))
    yield found["url"]
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


QUESTION = "What is the capital of France? Answer in one short sentence."


@pytest.mark.slow
@pytest.mark.heavy
def test_chat_completion_plain_and_streaming(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused", timeout=900)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=24, temperature=0.0)
    text = r.choices[0].message.content
    assert "Paris" in text, text  # the real model answers; a random or mis-converted one would not
    assert r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, temperature=0.0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces) == text  # greedy: the stream spells out the same answer
