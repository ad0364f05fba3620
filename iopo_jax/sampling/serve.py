"""OpenAI-compatible HTTP server over the JAX sampler, on FastAPI + uvicorn (``pip install -e ".[serve]"``).

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /health``. Supported request fields: ``model``, ``messages`` /
``prompt`` (string, list of strings, token ids or lists of token ids), ``n``, ``temperature``,
``top_p``, ``top_k`` (extension), ``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed``,
``stream`` (server-sent events) with ``stream_options.include_usage``, ``logprobs`` (chat: true with
``top_logprobs`` 0; completions: 0), ``echo`` (completions). Unsupported options with an effect
(penalties, tools, JSON mode, ``best_of`` > n, ``suffix``) are refused with a 400, never ignored.
Request bodies are checked against pydantic models (types), then for ranges and the context length.

One engine thread owns the sampler. With continuous batching (the sampler's default) it feeds every
new request into the running batch at the next scheduler round, so a request never waits for
others to finish; with ``--batching=static`` it runs the waiting requests as one batch at a time
(the batch-level engine; requests arriving meanwhile wait for the next batch). Streaming requests
receive text after every ``decode_chunk`` decode steps.

Invalid requests get a 4xx with an OpenAI-style JSON error body (``{"error": {"message", "type",
"param", "code"}}``); bodies over ``--max_body_mb`` get 413 and JSON nested deeper than
``MAX_JSON_DEPTH`` levels gets 400 (before parsing). An error inside the engine fails the requests
it was generating (500). The server binds 127.0.0.1 unless ``--host`` says otherwise; with
``--api_key`` (or the ``IOPO_API_KEY`` environment variable) every ``/v1`` request needs
``Authorization: Bearer <key>``.

Example::

    python -m iopo_jax.sampling.serve --model_dir=/ckpt/Qwen2-7B-Instruct --dtype=bfloat16 --port=8000
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); \\
        print(c.chat.completions.create(model='Qwen2-7B-Instruct', messages=[{'role': 'user', \\
        'content': 'Hi'}]).choices[0].message.content)"
"""

import asyncio
import hmac
import json
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
import uuid
from typing import Any, List, Optional, Union

import jax
from absl import flags

from data_pipeline import cli
from iopo_jax.sampling import Row, Sampler, SamplingParams
from iopo_jax.sampling.generate import LANE_PROMOTION_HELP, SCAN_LAYERS_HELP, parse_mesh

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
MAX_JSON_DEPTH = 64
API_KEY_ENV = "IOPO_API_KEY"


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- engine thread
class Job:
    """The rows of one HTTP request and the channel back to its handler (an asyncio queue)."""

    def __init__(self, rows: list[Row], stream: bool, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.rows = rows
        self.stream = stream
        self.loop = loop
        self.events: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.done = threading.Event()
        self.error: Optional[str] = None
        if stream:
            for k, r in enumerate(rows):
                r.on_update = self._updater(k)

    def put(self, ev: tuple):
        """Thread-safe: hand an event to the request's handler."""
        if self.loop is None:
            self.events.put(ev)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def finish(self, error: Optional[str] = None):
        if error:
            self.error = error
        self.done.set()
        self.put(("end",))

    def _updater(self, k):
        def on_update(row, delta, finished):
            self.put(("delta", k, delta, finished))

        return on_update

    def cancel(self):
        for r in self.rows:
            r.cancelled = True

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.rows)


class EngineLoop:
    """One thread that runs queued jobs through the sampler: continuous batching (every new job
    joins the running batch at the next round) or, for a sampler with ``continuous=False``,
    batch-level (the waiting jobs form a batch that runs to its end)."""

    def __init__(self, sampler, max_batch_size: Optional[int] = None, batch_wait_s: float = 0.005):
        self.sampler = sampler
        self.max_rows = int(max_batch_size or sampler.max_batch_size)
        self.batch_wait_s = batch_wait_s
        self.continuous = bool(getattr(sampler, "continuous", False))
        # continuous: lanes are sized to their rows (a lone request decodes at batch 1); the shapes that can
        # occur are few and are compiled ahead by Scheduler.warmup (--warmup)
        self.queue: "queue.Queue[Job]" = queue.Queue()
        self._carry: list[Job] = []
        self._stop = threading.Event()
        self._batches = 0
        self.thread = threading.Thread(target=self._loop, name="iopo-engine", daemon=True)

    @property
    def batches(self) -> int:
        """Batches run (batch-level) or prefill jobs admitted into the running batch (continuous)."""
        if self.continuous:
            return self._batches + self.sampler.scheduler.stats.batches
        return self._batches

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=30)

    def submit(self, job: Job):
        self.queue.put(job)

    def _loop(self):
        if self.continuous:
            self._loop_continuous()
        else:
            self._loop_batches()

    # ------------------------------------------------------------------ continuous batching
    def _loop_continuous(self):
        live: list[Job] = []
        while not self._stop.is_set():
            block = not live
            while True:
                try:
                    job = self.queue.get(timeout=0.1) if block else self.queue.get_nowait()
                except queue.Empty:
                    break
                block = False
                if job.cancelled:
                    job.finish()
                    continue
                self.sampler.submit(job.rows)
                live.append(job)
            if not live:
                continue
            try:
                self.sampler.step()
            except Exception as e:  # never let the engine thread die
                logger.exception("generation failed; failing %d requests", len(live))
                self._batches += self.sampler.scheduler.stats.batches
                self.sampler.reset_scheduler()
                for j in live:
                    j.finish(f"generation failed: {type(e).__name__}: {e}")
                live = []
                continue
            still = []
            for j in live:
                if j.finished:
                    j.finish()
                else:
                    still.append(j)
            live = still
        for j in live:
            j.finish("the server is shutting down")

    # ------------------------------------------------------------------ batch-level
    def _next_jobs(self) -> list[Job]:
        jobs = list(self._carry)
        self._carry = []
        if not jobs:
            try:
                jobs.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return []
        rows = sum(len(j.rows) for j in jobs)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_rows:
            try:
                j = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if rows + len(j.rows) > self.max_rows:
                self._carry.append(j)
                break
            jobs.append(j)
            rows += len(j.rows)
        live = []
        for j in jobs:
            if j.cancelled:  # the client left before its turn
                j.finish()
            else:
                live.append(j)
        return live

    def _loop_batches(self):
        while not self._stop.is_set():
            jobs = self._next_jobs()
            if not jobs:
                continue
            rows = [r for j in jobs for r in j.rows]
            error = None
            try:
                self.sampler.run_rows(rows)
                self._batches += 1
            except Exception as e:  # never let the engine thread die
                logger.exception("generation failed for a batch of %d sequences", len(rows))
                error = f"generation failed: {type(e).__name__}: {e}"
            for j in jobs:
                j.finish(error)


# ----------------------------------------------------------------------------- request validation
def _get(body: dict, name: str, types, default=None, *, allow_none: bool = True):
    if name not in body or (body[name] is None and allow_none):
        return default
    v = body[name]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                                          else (types,)))
    if not ok:
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise APIError(400, f"'{name}' must be of type {names}, got {type(v).__name__} ({json.dumps(v)[:80]})", name)
    return v


def _number(body, name, default, lo=None, hi=None, lo_open=False):
    v = _get(body, name, (int, float), default)
    if v is None:
        return v
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"'{name}' must be in {rng}, got {v}", name)
    return v


def _unsupported(body: dict):
    for name in ("frequency_penalty", "presence_penalty"):
        v = _number(body, name, 0, -2, 2)
        if v:
            raise APIError(400, f"'{name}' is not supported by this server (only 0)", name)
    rp = _number(body, "repetition_penalty", 1.0)
    if rp not in (None, 1, 1.0):
        raise APIError(400, "'repetition_penalty' is not supported by this server (only 1.0)", "repetition_penalty")
    for name in ("tools", "functions", "tool_choice", "function_call", "logit_bias"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise APIError(400, "'response_format' other than {'type': 'text'} is not supported", "response_format")


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(raw: bytes, limit: int) -> int:
    """Nesting depth of a JSON text (strings skipped); stops counting past ``limit``."""
    depth = best = 0
    for m in _JSON_TOKENS.finditer(raw):
        ch = m.group()
        if ch in (b"[", b"{"):
            depth += 1
            if depth > best:
                best = depth
                if best > limit:
                    break
        elif ch in (b"]", b"}"):
            depth -= 1
    return best


def parse_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The JSON object of a request body; APIError 400 for bad JSON, too deep nesting or a non-object."""
    if json_depth(raw, max_depth) > max_depth:
        raise APIError(400, f"the JSON body is nested deeper than {max_depth} levels")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, f"the JSON body is nested deeper than {max_depth} levels") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(body).__name__}")
    return body


def _models():
    """pydantic request models (built lazily so that the module imports without the serve extra)."""
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

    Number = Union[StrictInt, StrictFloat]

    class _Common(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown fields: checked by hand (refused when they matter)
        model: Optional[StrictStr] = None
        n: Optional[StrictInt] = None
        temperature: Optional[Number] = None
        top_p: Optional[Number] = None
        top_k: Optional[StrictInt] = None
        max_tokens: Optional[StrictInt] = None
        stop: Optional[Union[StrictStr, List[StrictStr]]] = None
        stop_token_ids: Optional[List[Any]] = None
        seed: Optional[StrictInt] = None
        stream: Optional[StrictBool] = None
        stream_options: Optional[dict] = None
        frequency_penalty: Optional[Number] = None
        presence_penalty: Optional[Number] = None
        repetition_penalty: Optional[Number] = None
        ignore_eos: Optional[StrictBool] = None
        skip_special_tokens: Optional[StrictBool] = None
        include_stop_str_in_output: Optional[StrictBool] = None

    class ChatCompletionRequest(_Common):
        messages: Optional[Any] = None
        max_completion_tokens: Optional[StrictInt] = None
        logprobs: Optional[StrictBool] = None
        top_logprobs: Optional[StrictInt] = None

    class CompletionRequest(_Common):
        prompt: Optional[Any] = None
        echo: Optional[StrictBool] = None
        logprobs: Optional[StrictInt] = None
        best_of: Optional[StrictInt] = None
        suffix: Optional[StrictStr] = None

    return ChatCompletionRequest, CompletionRequest


def validate_model(cls, body: dict) -> dict:
    """Check field types with the pydantic model ``cls``; APIError 400 naming the first bad field."""
    from pydantic import ValidationError

    try:
        cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        name = str(err["loc"][0]) if err.get("loc") else None
        raise APIError(400, f"'{loc}': {err.get('msg')} (got {json.dumps(body.get(name), default=str)[:80]})",
                       name) from None
    return body


class OpenAIServer:
    """The HTTP front end (FastAPI app served by uvicorn). ``start()`` serves in a background
    thread; ``shutdown()`` stops everything; ``serve_forever()`` blocks."""

    def __init__(self, sampler, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: Optional[str] = None, max_batch_size: Optional[int] = None, batch_wait_s: float = 0.005,
                 default_max_tokens: int = 512, max_body_bytes: int = MAX_BODY_BYTES,
                 max_json_depth: int = MAX_JSON_DEPTH):
        self.sampler = sampler
        self.model_name = model_name
        self.api_key = api_key or None
        self.default_max_tokens = int(default_max_tokens)
        self.max_body_bytes = int(max_body_bytes)
        self.max_json_depth = int(max_json_depth)
        self.created = int(time.time())
        self.engine = EngineLoop(sampler, max_batch_size, batch_wait_s)
        self.app = build_app(self)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)  # many clients may connect at once
        self._server = None
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/v1"

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        return self._server

    def start(self) -> "OpenAIServer":
        self.engine.start()
        server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, name="iopo-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the HTTP server did not start")
        return self

    def serve_forever(self):
        self.engine.start()
        try:
            self._uvicorn().run(sockets=[self.sock])
        finally:
            self.engine.stop()

    def shutdown(self):
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()
        self.engine.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ request -> rows
    def check_model(self, body: dict):
        model = _get(body, "model", str, allow_none=False)
        if model is None:
            raise APIError(400, "missing required field 'model'", "model")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def sampling(self, body: dict, num_prompt_tokens: int) -> tuple[SamplingParams, int]:
        """SamplingParams of a request and its ``n``; 400 on any bad field."""
        _unsupported(body)
        n = _get(body, "n", int, 1)
        if not 1 <= n <= self.engine.max_rows:
            raise APIError(400, f"'n' must be in [1, {self.engine.max_rows}], got {n}", "n")
        best_of = _get(body, "best_of", int, None)
        if best_of is not None and best_of != n:
            raise APIError(400, "'best_of' different from 'n' is not supported", "best_of")
        temperature = _number(body, "temperature", 1.0, 0, 2)
        top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
        top_k = _get(body, "top_k", int, 0)
        if top_k < -1:
            raise APIError(400, f"'top_k' must be -1, 0 (off) or positive, got {top_k}", "top_k")
        max_tokens = _get(body, "max_completion_tokens", int, None)
        max_tokens = _get(body, "max_tokens", int, max_tokens)
        ctx = self.sampler.max_model_len
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        if num_prompt_tokens < 1:
            raise APIError(400, "the prompt is empty", "messages")
        if max_tokens is None:
            if num_prompt_tokens >= ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                                    f"{num_prompt_tokens} tokens", "messages", "context_length_exceeded")
            max_tokens = min(self.default_max_tokens, ctx - num_prompt_tokens)
        if num_prompt_tokens + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                                f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                           "max_tokens", "context_length_exceeded")
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(s for s in stop)
        else:
            raise APIError(400, "'stop' must be a string or a list of strings", "stop")
        if any(not s for s in stop):
            raise APIError(400, "'stop' strings must not be empty", "stop")
        stop_ids = _get(body, "stop_token_ids", list, [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
            raise APIError(400, "'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
        seed = _get(body, "seed", int, None)
        try:
            self.sampler.check_length(num_prompt_tokens, max_tokens)
        except ValueError as e:
            raise APIError(400, str(e).replace("prompt: ", ""), "max_tokens", "context_length_exceeded") from None
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0),
                                max_new_tokens=max_tokens, seed=seed, n=n, stop=stop, stop_token_ids=tuple(stop_ids),
                                skip_special_tokens=bool(_get(body, "skip_special_tokens", bool, True)),
                                include_stop_str_in_output=bool(_get(body, "include_stop_str_in_output", bool,
                                                                     False)),
                                ignore_eos=bool(_get(body, "ignore_eos", bool, False)))
        return params, n

    def rows_for(self, prompts: list[list[int]], params: SamplingParams, want_logprobs: bool) -> list[Row]:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        params = params.replace(logprobs=want_logprobs)
        return [Row(ids, params, seed, prompt_index=i, sample_index=j)
                for i, ids in enumerate(prompts) for j in range(params.n)]

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if msgs is None:
            raise APIError(400, "missing required field 'messages'", "messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "developer"):
                raise APIError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}",
                               f"messages[{i}].role")
            if isinstance(content, list):
                parts = []
                for k, p in enumerate(content):
                    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise APIError(400, f"messages[{i}].content[{k}]: only text parts are supported",
                                       f"messages[{i}].content")
                    parts.append(p["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                               f"messages[{i}].content")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        try:
            return self.sampler.encode(clean, where="messages")
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise APIError(400, f"cannot apply the chat template to 'messages': {e}", "messages") from None

    def completion_prompts(self, body: dict) -> list[list[int]]:
        p = body.get("prompt")
        if p is None:
            raise APIError(400, "missing required field 'prompt'", "prompt")
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            items = p
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "token-id lists", "prompt")
        out = []
        for i, x in enumerate(items):
            if isinstance(x, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                raise APIError(400, f"prompt[{i}] must be a string or a list of integers", "prompt")
            try:
                out.append(self.sampler.encode(x, where=f"prompt[{i}]"))
            except ValueError as e:
                raise APIError(400, str(e), "prompt") from None
        return out




# ----------------------------------------------------------------------------- FastAPI app
def build_app(srv: OpenAIServer):
    """The FastAPI application of a server: routes, auth, error bodies, body limits, streaming."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ChatModel, CompletionModel = _models()
    app = FastAPI(title="iopo-jax OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        if e.status_code == 404:
            return error_response(APIError(404, f"unknown endpoint {request.url.path}", code="not_found"))
        if e.status_code == 405:
            return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request, e):  # a bug must not take the server down
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def check_auth(request: Request):
        key = srv.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type_="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            raise APIError(411, "chunked request bodies are not supported; send Content-Length")
        length = request.headers.get("content-length")
        if length is None:
            raise APIError(411, "missing Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise APIError(400, f"bad Content-Length header {length!r}") from None
        if n < 0 or n > srv.max_body_bytes:
            raise APIError(413, f"request body of {n} bytes is larger than {srv.max_body_bytes}")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > srv.max_body_bytes:
                raise APIError(413, f"request body is larger than {srv.max_body_bytes} bytes")
            chunks.append(part)
        return parse_body(b"".join(chunks), srv.max_json_depth)

    def model_card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "iopo-jax",
                "max_model_len": srv.sampler.max_model_len}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_auth(request)
        if name != srv.model_name:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_auth(request)
        body = validate_model(ChatModel, await read_body(request))
        loop = asyncio.get_running_loop()
        job, meta = await run_in_threadpool(_prepare_chat, srv, body, loop)
        return await _respond(srv, job, meta, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        body = validate_model(CompletionModel, await read_body(request))
        loop = asyncio.get_running_loop()
        job, meta = await run_in_threadpool(_prepare_completions, srv, body, loop)
        return await _respond(srv, job, meta, chat=False)

    async def _respond(srv, job: Job, meta: dict, chat: bool):
        srv.engine.submit(job)
        if meta["stream"]:
            return StreamingResponse(_stream(srv, job, meta, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "end":
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.error:
            raise APIError(500, job.error)
        return await run_in_threadpool(_final_body, srv, job, meta, chat)

    return app


def _prepare_chat(srv: OpenAIServer, body: dict, loop):
    srv.check_model(body)
    stream = _get(body, "stream", bool, False)
    stream_opts = _get(body, "stream_options", dict, {}) or {}
    logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, 0)
    if top:
        raise APIError(400, "'top_logprobs' > 0 is not supported (only the sampled token's log-prob)", "top_logprobs")
    ids = srv.chat_prompt(body)
    params, n = srv.sampling(body, len(ids))
    job = Job(srv.rows_for([ids], params, logprobs), stream, loop)
    meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), stream=stream, prompts=[ids],
                include_usage=bool(stream_opts.get("include_usage")), logprobs=logprobs)
    return job, meta


def _prepare_completions(srv: OpenAIServer, body: dict, loop):
    srv.check_model(body)
    stream = _get(body, "stream", bool, False)
    stream_opts = _get(body, "stream_options", dict, {}) or {}
    echo = _get(body, "echo", bool, False)
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported", "suffix")
    lp = _get(body, "logprobs", int, None)
    if lp is not None and lp != 0:
        raise APIError(400, "'logprobs' must be 0 or null (top alternatives are not computed)", "logprobs")
    if echo and (stream or lp is not None):
        raise APIError(400, "'echo' cannot be combined with 'stream' or 'logprobs'", "echo")
    prompts = srv.completion_prompts(body)
    if min(len(ids) for ids in prompts) < 1:
        raise APIError(400, "the prompt is empty", "prompt")
    if len(prompts) * (_get(body, "n", int, 1) or 1) > srv.engine.max_rows:
        raise APIError(400, f"{len(prompts)} prompts x n is more than the {srv.engine.max_rows} sequences "
                            "this server generates at once; send fewer prompts per request", "prompt")
    # The longest prompt decides the context check and the default max_tokens.
    params, _ = srv.sampling(body, max(len(ids) for ids in prompts))
    job = Job(srv.rows_for(prompts, params, lp is not None), stream, loop)
    meta = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), stream=stream, prompts=prompts,
                include_usage=bool(stream_opts.get("include_usage")), logprobs=lp is not None, echo=echo)
    return job, meta


def _usage(job: Job, prompts) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(len(r.token_ids) for r in job.rows)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _tokens(srv: OpenAIServer, r: Row) -> list[str]:
    s = srv.sampler
    if s.tokenizer is None:
        return [str(t) for t in r.token_ids]
    return [s.decode([t], skip_special_tokens=False) for t in r.token_ids]


def _chat_logprobs(srv, r: Row) -> dict:
    return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                        for s, lp in zip(_tokens(srv, r), r.logprobs)]}


def _completion_logprobs(srv, r: Row) -> dict:
    toks = _tokens(srv, r)
    offsets, pos = [], 0
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": list(r.logprobs), "top_logprobs": None, "text_offset": offsets}


def _final_body(srv: OpenAIServer, job: Job, meta: dict, chat: bool) -> dict:
    choices = []
    for k, r in enumerate(job.rows):
        if chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason,
                            "logprobs": _chat_logprobs(srv, r) if meta["logprobs"] else None})
        else:
            text = r.text
            if meta.get("echo"):
                text = srv.sampler.decode(r.prompt_ids, skip_special_tokens=False) + text
            choices.append({"index": k, "text": text, "finish_reason": r.finish_reason,
                            "logprobs": _completion_logprobs(srv, r) if meta["logprobs"] else None})
    return {"id": meta["id"], "object": "chat.completion" if chat else "text_completion", "created": meta["created"],
            "model": srv.model_name, "choices": choices, "usage": _usage(job, meta["prompts"]),
            "system_fingerprint": None}


async def _stream(srv: OpenAIServer, job: Job, meta: dict, chat: bool):
    """Server-sent events of a streaming request; the rows are cancelled when the client leaves."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    rid, created, model = meta["id"], meta["created"], srv.model_name

    def data(payload) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"

    def chunk(k, delta=None, text=None, finish=None):
        choice = {"index": k, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

    try:
        if chat:
            for k in range(len(job.rows)):
                yield data(chunk(k, delta={"role": "assistant", "content": ""}))
        while True:
            ev = await job.events.get()
            if ev[0] == "end":
                break
            _, k, delta, finished = ev
            if delta:
                yield data(chunk(k, delta={"content": delta}, text=delta))
            if finished:
                yield data(chunk(k, delta={}, text="", finish=job.rows[k].finish_reason))
        if job.error:
            yield data({"error": APIError(500, job.error).body()["error"]})
        elif meta["include_usage"]:
            yield data({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": _usage(job, meta["prompts"])})
        yield b"data: [DONE]\n\n"
    finally:
        if not job.done.is_set():
            job.cancel()  # the client went away: stop its rows at the next chunk


# ----------------------------------------------------------------------------- command line
def parse_warmup(items) -> list[tuple[int, int]]:
    """``["200:256", "2000:512"]`` -> ``[(200, 256), (2000, 512)]``."""
    out = []
    for it in items:
        a, sep, b = str(it).partition(":")
        try:
            out.append((int(a), int(b)))
        except ValueError:
            sep = ""
        if not sep or min(out[-1]) < 1:
            raise ValueError(f"--warmup: expected PROMPT_TOKENS:MAX_TOKENS pairs of positive integers, got {it!r}")
    return out


def _define_flags():
    f = flags
    f.DEFINE_string("model_dir", None, "HF checkpoint directory (config.json + safetensors + tokenizer)")
    f.DEFINE_string("lora", None, "PEFT LoRA adapter directory applied on top of --model_dir")
    f.DEFINE_string("tokenizer_dir", None, "tokenizer directory (default: --model_dir)")
    f.DEFINE_string("served_model_name", None, "model id clients must send (default: the last part of --model_dir)")
    f.DEFINE_string("host", "127.0.0.1", "address to bind (127.0.0.1 = this machine only)")
    f.DEFINE_integer("port", 8000, "port to bind (0 = any free port)")
    f.DEFINE_string("api_key", None, f"require 'Authorization: Bearer <key>' (default: env {API_KEY_ENV}, if set)")
    f.DEFINE_integer("max_batch_size", 32, "sequences generated together (concurrent requests share a batch)")
    f.DEFINE_integer("max_model_len", 0, "context limit: prompt + new tokens (0 = the model's maximum)")
    f.DEFINE_integer("default_max_tokens", 512, "max_tokens of requests that do not set it (capped by the context)")
    f.DEFINE_integer("decode_chunk", 16, "decode steps between host checks (streaming granularity)")
    f.DEFINE_float("batch_wait_ms", 5.0, "--batching=static: how long the engine waits for more requests before "
                   "starting a batch")
    f.DEFINE_enum("batching", "continuous", ["continuous", "static"],
                  "continuous: new requests join the running batch at the next step (default); static: the "
                  "batch-level engine (waiting requests form a batch that runs to its end)")
    f.DEFINE_integer("prefill_chunk", 512, "long prompts are prefilled in chunks of this many tokens, between "
                     "decode steps of the running requests")
    f.DEFINE_list("warmup", [], "continuous batching: compile ahead every shape requests of these classes can "
                  "produce, as PROMPT_TOKENS:MAX_TOKENS pairs (e.g. '200:256,2000:512'); otherwise the first "
                  "requests of a new shape wait for its compilation")
    f.DEFINE_integer("prefill_budget", 512, "continuous batching: padded prompt tokens prefilled per scheduler round "
                     "(at least one chunk) between decode chunks of the running requests; lower = running "
                     "requests are held up less by new long prompts")
    f.DEFINE_bool("lane_promotion", True, LANE_PROMOTION_HELP)
    f.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"], SCAN_LAYERS_HELP)
    f.DEFINE_integer("max_body_mb", MAX_BODY_BYTES >> 20, "largest request body accepted (413 above)")
    f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype")
    f.DEFINE_string("mesh", "", "device mesh, e.g. 'fsdp=-1' or 'fsdp=4,tensor=2' (default: fsdp over all devices)")
    f.DEFINE_string("compilation_cache_dir", None, "persistent JAX compilation cache directory (faster restarts)")
    flags.mark_flag_as_required("model_dir")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if F.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", F.compilation_cache_dir)
    api_key = F.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        shapes = parse_warmup(F.warmup)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if F.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model", F.host)
    sampler = Sampler.from_pretrained(F.model_dir, lora=F.lora, mesh=parse_mesh(F.mesh), dtype=F.dtype,
                                      param_dtype=F.dtype, tokenizer_dir=F.tokenizer_dir,
                                      max_batch_size=F.max_batch_size, max_model_len=F.max_model_len or None,
                                      decode_chunk=F.decode_chunk, prefill_chunk=F.prefill_chunk,
                                      prefill_budget=F.prefill_budget, continuous=F.batching == "continuous",
                                      lane_promotion=F.lane_promotion, scan_layers=F.scan_layers)
    if shapes:
        if sampler.continuous:
            t0 = time.perf_counter()
            compiled = sampler.scheduler.warmup(shapes)
            logger.info("warm-up of %s: %d compilations in %.1f s", F.warmup, sum(compiled.values()),
                        time.perf_counter() - t0)
        else:
            logger.warning("--warmup applies to continuous batching only; ignored with --batching=static")
    name = F.served_model_name or os.path.basename(os.path.normpath(F.model_dir))
    server = OpenAIServer(sampler, model_name=name, host=F.host, port=F.port, api_key=api_key,
                          batch_wait_s=F.batch_wait_ms / 1000, default_max_tokens=F.default_max_tokens,
                          max_body_bytes=F.max_body_mb << 20)
    host, port = server.address
    logger.info("serving '%s' on http://%s:%d/v1 (auth %s)", name, host, port, "on" if api_key else "off")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.sock.close()


if __name__ == "__main__":
    _define_flags()
    cli.run_app(main)
