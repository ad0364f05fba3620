"""OpenAI-compatible chat client (LLM judges, API generation, synthesis), standard library only.

Works with any server speaking ``POST {base_url}/chat/completions`` (OpenAI, DashScope compatible
mode, vLLM, ``iopo_jax.sampling.serve``). Features:

* **Secrets.** The API key is read from the environment variable *named* by
  ``ClientConfig.api_key_env``; the key itself is never part of a config, a log line, an error message
  (any occurrence is replaced by ``***``) or a file written by this module.
* **Bounded concurrency.** At most ``concurrency`` requests are in flight (a semaphore); every worker
  thread keeps one keep-alive HTTP connection.
* **Retries.** Timeouts, connection errors (refused, reset, dropped), malformed bodies, HTTP 429 and
  5xx are retried up to ``max_retries`` times with exponential backoff and jitter; a 429's
  ``Retry-After`` (seconds or HTTP date) is honoured. Every retry is logged at WARNING level. Other 4xx
  fail at once.
* **Budget.** ``request_budget`` caps the HTTP requests (retries included) one client sends in a run;
  beyond it :class:`BudgetExhaustedError` is raised and nothing more is sent.
* **Resumable store.** Each successful response is appended to a JSONL file (``store_path``) the moment
  it arrives (flushed at once; see :mod:`iopo_jax.io_utils`), keyed by the sha256 of (model, messages,
  sampling params, attempt). A rerun answers every stored key from the file and re-sends nothing that
  already succeeded.
* **Accounting.** Requests, retries, cache hits, prompt/completion tokens and cost (price per 1K prompt
  and completion tokens) are counted per run and reported by :meth:`ChatClient.usage`.

Example::

    cfg = ClientConfig(base_url="https://api.openai.com/v1", model="gpt-4o",
                       api_key_env="OPENAI_API_KEY", temperature=0.0, top_p=0.8,
                       store_path="/tmp/run/judge_cache.jsonl")
    client = ChatClient(cfg)
    result = client.complete([{"role": "user", "content": "Say hi"}])
    print(result.text, client.usage())

Used by the LLM judges of the evaluation (:mod:`evaluation.driver`), API generation
(:mod:`evaluation.generate`), the RL judge reward (:mod:`iopo_jax.rl.rewards`) and data synthesis
(:mod:`iopo_jax.tools.synthesize`). The EIFBench protocol texts live in :mod:`data_pipeline.protocols.eifbench`.
"""
from __future__ import annotations

import dataclasses
import email.utils
import http.client
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Mapping, Optional, Sequence

from data_pipeline import schema
from data_pipeline.hashing import sha256_hex
from iopo_jax import io_utils

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


@dataclasses.dataclass
class ClientConfig:
    """Settings of a :class:`ChatClient` (no secret is ever stored here)."""

    base_url: str = ""  # e.g. "https://api.openai.com/v1"; requests go to {base_url}/chat/completions.
    model: str = ""  # model name sent in the request body.
    api_key_env: str = ""  # NAME of the env var holding the API key; "" = send no Authorization header.
    temperature: float = 0.0  # sampling temperature sent to the server.
    top_p: float = 1.0  # nucleus sampling mass sent to the server.
    max_tokens: int = 0  # completion token cap sent to the server; 0 = do not send the field.
    timeout_s: float = 120.0  # socket timeout per request (connect and each read), seconds.
    concurrency: int = 8  # max requests in flight.
    max_retries: int = 6  # retries per request after the first try (timeouts, conn errors, 429, 5xx).
    backoff_base_s: float = 1.0  # first backoff delay; doubles per retry, with jitter in [50%, 100%].
    backoff_max_s: float = 60.0  # cap of one backoff delay.
    max_retry_after_s: float = 300.0  # cap on a server's Retry-After.
    request_budget: int = 0  # max HTTP requests (retries included) this client sends per run; 0 = no cap.
    price_prompt_per_1k: float = 0.0  # cost per 1,000 prompt tokens (any currency), for the usage report.
    price_completion_per_1k: float = 0.0  # cost per 1,000 completion tokens.
    store_path: str = ""  # JSONL response store (cache + audit trail); "" = no store.
    store_prompts: bool = False  # also keep the request messages in the store (large for EIFBench).
    fsync_interval_s: float = 1.0  # fsync the store at most this often (every line is flushed at once).
    name: str = "judge"  # label used in log lines.

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, section: str = "", ignore: Sequence[str] = (),
                     **overrides: Any) -> "ClientConfig":
        """The config held by ``mapping`` (e.g. an ``ml_collections`` section), field for field: ``mapping``
        must hold every field that ``overrides`` does not set, and nothing else but the keys named in
        ``ignore`` (settings of the caller, not of the client); errors name ``section`` and the keys that do
        not match (:func:`data_pipeline.schema.from_mapping` with ``complete=True``)."""
        return schema.from_mapping(cls, mapping, section, tuple(ignore), complete=True, **overrides)


class ChatError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retryable status)."""


class BudgetExhaustedError(ChatError):
    """The per-run request budget is spent; nothing more is sent."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None, stale: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.stale = stale  # a reused keep-alive connection was closed by the server


@dataclasses.dataclass
class ChatResult:
    text: str
    key: str
    cached: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    attempts: int = 0  # HTTP requests spent on this result in this run (0 for a cache hit)


def request_key(model: str, messages: Messages, params: dict[str, Any], attempt: int = 0) -> str:
    """sha256 over (model, messages, params[, attempt]); attempt 0 keeps the plain key."""
    payload: dict[str, Any] = {"model": model, "messages": list(messages), "params": params}
    if attempt:
        payload["attempt"] = int(attempt)
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return sha256_hex(blob)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - time.time())


class ChatClient:
    """Thread-safe OpenAI-compatible chat client (see module docstring)."""

    def __init__(self, config: ClientConfig):
        if not config.base_url:
            raise ValueError(f"{config.name}: base_url is empty; pass the server's URL, e.g. "
                             "--judge_base_url=https://api.openai.com/v1")
        if not config.model:
            raise ValueError(f"{config.name}: model is empty; pass the model name (e.g. --judge_model=gpt-4o)")
        self.config = config
        self._api_key = ""
        if config.api_key_env:
            self._api_key = os.environ.get(config.api_key_env, "")
            if not self._api_key:
                raise ValueError(
                    f"{config.name}: environment variable {config.api_key_env} is not set; export the API "
                    f"key there (or set api_key_env to '' for a server without authentication)")
        url = urllib.parse.urlsplit(config.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{config.name}: base_url {config.base_url!r} must look like http(s)://host[:port]/path")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._path = url.path.rstrip("/") + "/chat/completions"
        self._ssl_context = ssl.create_default_context() if url.scheme == "https" else None
        self._local = threading.local()
        self._sem = threading.BoundedSemaphore(max(1, int(config.concurrency)))
        self._lock = threading.Lock()
        self._params = self._sampling_params()
        self._store: dict[str, dict[str, Any]] = {}
        self._appender: Optional[io_utils.JsonlAppender] = None
        if config.store_path:
            for rec in io_utils.read_jsonl(config.store_path):
                if rec.get("key") and isinstance(rec.get("text"), str):
                    self._store.setdefault(rec["key"], rec)
            self._appender = io_utils.JsonlAppender(config.store_path,
                                                    fsync_interval_s=config.fsync_interval_s)
        # Per-run accounting.
        self._requests_sent = 0
        self._retries = 0
        self._cache_hits = 0
        self._successes = 0
        self._failures = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._budget_warned = False
        self._abort = threading.Event()

    # ------------------------------------------------------------------ public API

    @property
    def params(self) -> dict[str, Any]:
        """The sampling params sent with every request (and hashed into every key)."""
        return dict(self._params)

    def key(self, messages: Messages, attempt: int = 0) -> str:
        return request_key(self.config.model, messages, self._params, attempt)

    def cached(self, messages: Messages, attempt: int = 0) -> Optional[ChatResult]:
        rec = self._store.get(self.key(messages, attempt))
        if rec is None:
            return None
        return self._result_from_record(rec, cached=True)

    def complete(self, messages: Messages, *, attempt: int = 0) -> ChatResult:
        """Returns the reply to ``messages``, from the store when already answered.

        ``attempt`` > 0 asks for a fresh answer to the same messages (used to retry a reply that could
        not be parsed); each attempt index has its own key in the store.

        Raises:
          BudgetExhaustedError: the request budget is spent.
          ChatError: retries exhausted or a non-retryable HTTP status.
        """
        key = self.key(messages, attempt)
        rec = self._store.get(key)
        if rec is not None:
            with self._lock:
                self._cache_hits += 1
            return self._result_from_record(rec, cached=True)
        body = dict(self._params)
        body["model"] = self.config.model
        body["messages"] = list(messages)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        cfg = self.config
        tries = 0
        retry = 0
        stale_retry_used = False
        while True:
            if self._abort.is_set():
                raise ChatError(f"{cfg.name} request {key[:12]}: aborted")
            self._take_budget(key)
            tries += 1
            try:
                with self._sem:
                    reply = self._post(payload)
            except _Retryable as e:
                if e.stale and not stale_retry_used:
                    # A reused keep-alive connection closed under us: reconnect at once, once.
                    stale_retry_used = True
                    with self._lock:
                        self._retries += 1
                    logger.warning("%s request %s: %s on a reused connection; reconnecting and retrying now",
                                   cfg.name, key[:12], self._redact(e.reason))
                    continue
                if retry >= cfg.max_retries:
                    with self._lock:
                        self._failures += 1
                    msg = (f"{cfg.name} request {key[:12]} failed after {tries} tries: "
                           f"{self._redact(e.reason)}")
                    logger.error("%s", msg)
                    raise ChatError(msg) from None
                delay = self._backoff(retry, e.retry_after)
                retry += 1
                with self._lock:
                    self._retries += 1
                logger.warning("%s request %s: %s; retry %d/%d in %.2f s", cfg.name, key[:12],
                               self._redact(e.reason), retry, cfg.max_retries, delay)
                self._abort.wait(delay)
                continue
            except ChatError as e:
                with self._lock:
                    self._failures += 1
                msg = self._redact(str(e))
                logger.error("%s request %s: %s", cfg.name, key[:12], msg)
                raise ChatError(msg) from None
            break
        text, usage, finish = reply
        rec = {
            "key": key,
            "model": cfg.model,
            "params": self._params,
            "attempt": attempt,
            "text": text,
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": finish,
            "time": time.time(),
        }
        if cfg.store_prompts:
            rec["messages"] = list(messages)
        with self._lock:
            self._successes += 1
            self._prompt_tokens += rec["prompt_tokens"]
            self._completion_tokens += rec["completion_tokens"]
            self._store[key] = rec
        if self._appender is not None:
            self._appender.append(rec)
        result = self._result_from_record(rec, cached=False)
        result.attempts = tries
        return result

    def usage(self) -> dict[str, Any]:
        """Per-run counters plus the totals held in the store (all runs)."""
        cfg = self.config
        with self._lock:
            out = {
                "model": cfg.model,
                "requests_sent": self._requests_sent,
                "retries": self._retries,
                "cache_hits": self._cache_hits,
                "successes": self._successes,
                "failures": self._failures,
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "request_budget": cfg.request_budget,
            }
            store_pt = sum(int(r.get("prompt_tokens") or 0) for r in self._store.values())
            store_ct = sum(int(r.get("completion_tokens") or 0) for r in self._store.values())
            n_store = len(self._store)
        out["cost"] = self._cost(out["prompt_tokens"], out["completion_tokens"])
        out["store_responses"] = n_store
        out["store_prompt_tokens"] = store_pt
        out["store_completion_tokens"] = store_ct
        out["store_cost"] = self._cost(store_pt, store_ct)
        out["price_prompt_per_1k"] = cfg.price_prompt_per_1k
        out["price_completion_per_1k"] = cfg.price_completion_per_1k
        return out

    def abort(self) -> None:
        """Makes every pending and future request fail at once (Ctrl-C); requests already on the wire
        finish (their replies are still stored)."""
        self._abort.set()

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _sampling_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"temperature": float(self.config.temperature), "top_p": float(self.config.top_p)}
        if self.config.max_tokens:
            p["max_tokens"] = int(self.config.max_tokens)
        return p

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        c = self.config
        return round(prompt_tokens / 1000.0 * c.price_prompt_per_1k
                     + completion_tokens / 1000.0 * c.price_completion_per_1k, 6)

    def _result_from_record(self, rec: dict[str, Any], cached: bool) -> ChatResult:
        return ChatResult(text=rec["text"], key=rec["key"], cached=cached,
                          prompt_tokens=int(rec.get("prompt_tokens") or 0),
                          completion_tokens=int(rec.get("completion_tokens") or 0),
                          finish_reason=rec.get("finish_reason"))

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    def _take_budget(self, key: str) -> None:
        budget = self.config.request_budget
        with self._lock:
            if budget and self._requests_sent >= budget:
                warn = not self._budget_warned
                self._budget_warned = True
                self._failures += 1
            else:
                self._requests_sent += 1
                return
        if warn:
            logger.warning("%s: request budget of %d requests is spent; no more requests are sent "
                           "(rerun to continue, or raise the budget)", self.config.name, budget)
        raise BudgetExhaustedError(f"{self.config.name} request {key[:12]}: request budget "
                                   f"({budget}) exhausted")

    def _backoff(self, retry: int, retry_after: Optional[float]) -> float:
        cfg = self.config
        if retry_after is not None:
            base = min(retry_after, cfg.max_retry_after_s)
            return base + random.uniform(0.0, 0.1 * max(base, 0.1))
        cap = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** retry))
        return cap * random.uniform(0.5, 1.0)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.config.timeout_s,
                                               context=self._ssl_context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.config.timeout_s)
        conn.connect()
        try:  # small requests should not wait for Nagle's algorithm
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self._local.conn = conn
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # pylint: disable=broad-except
                pass

    def _post(self, payload: bytes) -> tuple[str, dict[str, Any], Optional[str]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = "Bearer " + self._api_key
        reused = False
        try:
            conn, reused = self._connection()
            conn.request("POST", self._path, body=payload, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            retry_after = resp.getheader("Retry-After")
            data = resp.read()
            if resp.will_close:
                self._drop_connection()
        except socket.timeout:
            self._drop_connection()
            raise _Retryable(f"timeout after {self.config.timeout_s:g} s") from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            self._drop_connection()
            raise _Retryable(f"connection dropped ({type(e).__name__})", stale=reused) from None
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise _Retryable(f"connection error ({type(e).__name__}: {e})") from None
        if status == 429:
            raise _Retryable("HTTP 429 (rate limited)" + (f", Retry-After {retry_after}" if retry_after else ""),
                             retry_after=parse_retry_after(retry_after))
        if status >= 500:
            raise _Retryable(f"HTTP {status}: {self._snippet(data)}")
        if status != 200:
            raise ChatError(f"HTTP {status} from {self.config.base_url}: {self._snippet(data)}")
        try:
            obj = json.loads(data.decode("utf-8"))
            choice = obj["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed response body ({type(e).__name__}): {self._snippet(data)}") from None
        usage = obj.get("usage") or {}
        return text, usage if isinstance(usage, dict) else {}, choice.get("finish_reason")

    def _snippet(self, data: bytes, n: int = 300) -> str:
        """The start of a response body for error messages, redacted *before* it is cut."""
        text = self._redact(data.decode("utf-8", errors="replace").replace("\n", " "))
        return text[:n] + ("..." if len(text) > n else "")
