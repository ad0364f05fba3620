"""A real, scriptable OpenAI-compatible chat server for tests and benchmarks (127.0.0.1 only).

It implements ``POST /v1/chat/completions`` on a ``ThreadingHTTPServer`` running in a daemon thread
(port 0 = a free port; ``base_url`` gives ``http://127.0.0.1:PORT/v1``). Behaviour is scripted:

* ``reply_fn(request_body: dict) -> str`` maps the parsed request to the reply text (default: echo of
  the last user message). It may also return a dict ``{"text": ..., "prompt_tokens": ...,
  "completion_tokens": ...}``.
* ``faults``: a dict ``{request_number: fault}`` (request numbers count from 1 over every POST the
  server receives) or a callable ``(request_number, request_body) -> fault | None``. Faults:
  ``"timeout"`` (sleep ``timeout_sleep_s`` before answering, past the client's timeout), ``"429"``
  (HTTP 429 with ``Retry-After: retry_after_s``), ``"500"`` / ``"503"``, ``"garbage"`` (HTTP 200, a
  valid completion whose text is garbage without any verdict), ``"bad_json"`` (HTTP 200 with a body
  that is not JSON), ``"drop"`` (read the request, then close the socket without a reply).
* ``latency_s``: a sleep before every normal reply (benchmarks, SIGKILL tests).
* ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get HTTP 401.
* ``echo_headers_in_errors``: error bodies repeat the request headers (Authorization included), like a
  badly behaved proxy; used to check that clients redact secrets from error text.
* ``max_inflight``: the most requests the server was handling at one time (concurrency checks).

Every request received is recorded in ``server.requests`` (a list of :class:`Received`, thread-safe).

Example::

    with FakeJudge(reply_fn=lambda body: "Constraints Overall Score: [[10]]", faults={2: "429"}) as fj:
        client = ChatClient(ClientConfig(base_url=fj.base_url, model="m"))
        ...
    assert len(fj.requests) == 3

Standalone (for benchmarks, a separate process so the server does not share the client's GIL)::

    python tests/fake_judge.py --latency_s=0 --reply="Constraints Overall Score: [[10]]"

prints ``PORT <n>`` on its first stdout line and serves until killed.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional, Union

Fault = Optional[str]
FaultSpec = Union[dict[int, str], Callable[[int, dict], Fault], None]


@dataclasses.dataclass
class Received:
    number: int  # 1-based arrival order
    body: dict  # parsed JSON body ({} when unparseable)
    headers: dict
    fault: Fault  # the fault injected for this request (None = normal reply)
    status: Optional[int] = None  # HTTP status sent (None for a dropped connection / pending)
    reply_text: Optional[str] = None  # reply text of a 200 answer

    @property
    def messages(self) -> list:
        return self.body.get("messages", [])

    @property
    def prompt(self) -> str:
        """Concatenated message contents (handy for matching in reply functions)."""
        return "\n".join(str(m.get("content", "")) for m in self.messages)


def _default_reply(body: dict) -> str:
    msgs = body.get("messages") or [{}]
    return "echo: " + str(msgs[-1].get("content", ""))


class FakeJudge:
    """Scriptable OpenAI-compatible server (see module docstring)."""

    def __init__(self, reply_fn: Callable[[dict], Any] = _default_reply, *, faults: FaultSpec = None,
                 latency_s: float = 0.0, timeout_sleep_s: float = 2.0, retry_after_s: float = 0.2,
                 api_key: Optional[str] = None, record_bodies: bool = True,
                 echo_headers_in_errors: bool = False):
        self.reply_fn = reply_fn
        self.faults = faults
        self.latency_s = latency_s
        self.timeout_sleep_s = timeout_sleep_s
        self.retry_after_s = retry_after_s
        self.api_key = api_key
        self.record_bodies = record_bodies
        self.echo_headers_in_errors = echo_headers_in_errors  # mimic a proxy that echoes request headers
        self.inflight = 0
        self.max_inflight = 0  # the most requests handled at the same time
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._count = 0
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle
    def start(self) -> "FakeJudge":
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
                # the client's delayed ACK add ~40 ms to every reply.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):  # silence the default stderr access log
                pass

            def do_POST(self):  # noqa: N802
                judge._handle(self)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                # Clients time out / drop connections on purpose in tests; stay quiet.
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-judge", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- inspection helpers
    def count(self) -> int:
        with self._lock:
            return self._count

    def successes(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.status == 200 and r.fault is None]

    # -- request handling
    def _fault_for(self, number: int, body: dict) -> Fault:
        if self.faults is None:
            return None
        if callable(self.faults):
            return self.faults(number, body)
        return self.faults.get(number)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        h.iopo_counted = True  # in flight until its answer starts going out (see _answered)
        try:
            self._handle_inner(h)
        finally:
            self._answered(h)

    def _answered(self, h) -> None:
        """Ends a request's in-flight time once, before its answer is written: a client that bounds its
        concurrency may send its next request as soon as it has read this answer."""
        if getattr(h, "iopo_counted", False):
            h.iopo_counted = False
            with self._lock:
                self.inflight -= 1

    def _handle_inner(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            body = {}
        with self._lock:
            self._count += 1
            number = self._count
            fault = self._fault_for(number, body)
            rec = Received(number=number, body=body if self.record_bodies else {},
                           headers=dict(h.headers.items()), fault=fault)
            self.requests.append(rec)
        if h.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(h, rec, 404, {"error": {"message": f"no route {h.path}"}})
            return
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._send(h, rec, 401, {"error": {"message": "invalid api key"}})
            return
        if fault == "drop":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "timeout":
            time.sleep(self.timeout_sleep_s)
        elif fault == "429":
            self._send(h, rec, 429, {"error": {"message": "rate limited"}},
                       extra_headers={"Retry-After": f"{self.retry_after_s:g}"})
            return
        elif fault in ("500", "502", "503"):
            self._send(h, rec, int(fault), {"error": {"message": "internal error"}})
            return
        elif fault == "bad_json":
            self._send_raw(h, rec, 200, b"<html>this is not json</html>")
            return
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault == "garbage":
            out: Any = "I am not sure what to say about this. Lorem ipsum dolor sit amet."
        else:
            out = self.reply_fn(body)
        if isinstance(out, dict):
            text = out["text"]
            pt, ct = out.get("prompt_tokens"), out.get("completion_tokens")
        else:
            text, pt, ct = out, None, None
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        reply = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": pt if pt is not None else max(1, prompt_chars // 4),
                      "completion_tokens": ct if ct is not None else max(1, len(text) // 4)},
        }
        reply["usage"]["total_tokens"] = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
        rec.reply_text = text
        self._send(h, rec, 200, reply)

    def _send(self, h, rec: Received, status: int, obj: dict, extra_headers: Optional[dict] = None) -> None:
        if status != 200 and self.echo_headers_in_errors:
            hdrs = dict(h.headers.items())
            hdrs = {"Authorization": hdrs.pop("Authorization", None), **hdrs}
            obj = dict(obj, request_headers=hdrs)
        self._send_raw(h, rec, status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), extra_headers)

    def _send_raw(self, h, rec: Received, status: int, data: bytes, extra_headers: Optional[dict] = None) -> None:
        self._answered(h)
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (extra_headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
            rec.status = status
        except OSError:
            # The client gave up (timeout) and closed the socket.
            h.close_connection = True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency_s", type=float, default=0.0)
    p.add_argument("--reply", default="Constraints Overall Score: [[10]]")
    args = p.parse_args(argv)
    judge = FakeJudge(reply_fn=lambda body: args.reply, latency_s=args.latency_s, record_bodies=False)
    judge.start()
    print(f"PORT {judge.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        judge.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
