"""Generation backends behind one small interface (:class:`evaluation.driver.Generator`).

* :class:`PredictionsFileGenerator` - answers read from a JSONL file of ``{"id": ..., "response": ...}``
  lines (``predictions.jsonl`` of an earlier run has this format). For EIFBench the id is
  ``"<split>/<main_id>"`` (e.g. ``party100/7``); a bare ``main_id`` is accepted when only one split
  is evaluated. The keys ``output``, ``generated``, ``prediction`` and ``answer`` are accepted in place
  of ``response``.
* :class:`ChatAPIGenerator` - any OpenAI-compatible chat model, through the same client as the judge
  (:class:`iopo_jax.chat_client.ChatClient`, with its own response store, so an interrupted generation
  pass resumes without re-sending).
* :class:`JaxSamplerGenerator` - our own JAX sampler (``iopo_jax.sampling``) through
  :func:`jax_sampler_stream` (continuous batching; each answer as soon as it finishes).
  :func:`jax_sampler_generate` answers one batch (used by ``evaluation.before_after``).
"""
from __future__ import annotations

import functools
import os

import concurrent.futures as cf
import json
import logging
from typing import Any, Iterator, Optional, Sequence

from data_pipeline.hashing import seed63
from data_pipeline.schema import from_mapping
from evaluation import driver
from iopo_jax import io_utils
from iopo_jax import chat_client
from iopo_jax.sampling import Row, Sampler, SamplingParams
from iopo_jax.sampling.sampler import resolve_scan_layers

logger = logging.getLogger(__name__)

RESPONSE_KEYS = ("response", "output", "generated", "prediction", "answer")


class SamplerUnavailableError(RuntimeError):
    """The JAX sampler cannot be used (its model directory is missing)."""


def load_predictions_file(path: str) -> dict[str, str]:
    """{id: response} from a JSONL predictions file; errors name file, line and field."""
    out: dict[str, str] = {}
    for lineno, line in io_utils.iter_nonempty_lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}:{lineno}: missing field 'id'")
        text = next((rec[k] for k in RESPONSE_KEYS if k in rec), None)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: missing string field 'response' "
                             f"(or one of {', '.join(RESPONSE_KEYS[1:])})")
        uid = str(rec["id"])
        if "split" in rec and "/" not in uid:
            uid = f"{rec['split']}/{uid}"
        if uid in out:
            raise ValueError(f"{path}:{lineno}: duplicate id {uid!r}")
        out[uid] = text
    return out


class PredictionsFileGenerator:
    """Answers from a predictions file; requests whose unit id is absent yield nothing."""

    whole_units = True  # one answer per unit (parts are not generated separately)

    def __init__(self, path: str):
        self.path = path
        self.name = "predictions file"
        self._preds = load_predictions_file(path)

    def lookup(self, unit_id: str) -> Optional[str]:
        if unit_id in self._preds:
            return self._preds[unit_id]
        bare = unit_id.rsplit("/", 1)[-1]
        if "/" in unit_id and bare in self._preds:
            return self._preds[bare]
        return None

    def generate(self, requests: Sequence[driver.GenRequest]) -> Iterator[driver.GenResult]:
        for r in requests:
            text = self.lookup(r.id.rpartition("#")[0])
            if text is not None:
                yield driver.GenResult(r.id, text)


class ChatAPIGenerator:
    """Answers from an OpenAI-compatible chat endpoint, ``concurrency`` requests at a time."""

    def __init__(self, config: chat_client.ClientConfig):
        self.client = chat_client.ChatClient(config)
        self.name = f"api:{config.model}"
        self.concurrency = config.concurrency

    def generate(self, requests: Sequence[driver.GenRequest]) -> Iterator[driver.GenResult]:
        def one(r: driver.GenRequest) -> driver.GenResult:
            try:
                return driver.GenResult(r.id, self.client.complete(r.messages).text)
            except chat_client.ChatError as e:
                return driver.GenResult(r.id, None, str(e))

        pool = cf.ThreadPoolExecutor(max_workers=max(1, self.concurrency), thread_name_prefix="gen")
        try:
            futures = [pool.submit(one, r) for r in requests]
            for fut in cf.as_completed(futures):
                yield fut.result()
        except BaseException:
            self.client.abort()  # Ctrl-C: stop retry loops at once
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def usage(self) -> dict[str, Any]:
        return self.client.usage()

    def close(self) -> None:
        self.client.close()


_PROVIDED: dict = {}


def provide_sampler(model_dir: str, lora: str, factory) -> None:
    """Answer generation for ``(model_dir, lora)`` with the Sampler ``factory()`` returns (called on first use;
    the caller owns it, e.g. to reuse one compiled sampler for two evaluations); ``factory=None`` removes it."""
    if factory is None:
        _PROVIDED.pop((model_dir, lora or ""), None)
    else:
        _PROVIDED[(model_dir, lora or "")] = factory


@functools.lru_cache(maxsize=2)
def _cached_sampler(model_dir: str, lora: str, scan_layers: bool):
    return Sampler.from_pretrained(model_dir, lora=lora or None, scan_layers=scan_layers)


def _sampler_for(model_dir: str, lora: str, scan_layers="auto"):
    """The provided sampler of ``(model_dir, lora)`` (:func:`provide_sampler`) or the cached one, built with
    ``scan_layers`` (see :func:`iopo_jax.sampling.sampler.resolve_scan_layers`)."""
    factory = _PROVIDED.get((model_dir, lora or ""))
    return factory() if factory is not None else _cached_sampler(model_dir, lora, resolve_scan_layers(scan_layers))


def unit_seed(seed: int, request_id: str) -> int:
    """A 63-bit sampling seed from the run seed and a request id (``<unit id>#<part>``): the same for a
    unit whatever its position in its batch, so a resumed evaluation samples what an uninterrupted one does."""
    return seed63(f"{seed}\x00{request_id}")


def jax_sampler_generate(model_dir: str, batch: Sequence[list[dict[str, str]]], *, temperature: float,
                         top_p: float, max_new_tokens: int, seed: int, lora: str = "",
                         ids: Optional[Sequence[str]] = None) -> list[str]:
    """Answers a batch of chat conversations with our JAX sampler, one string each.

    The model (``model_dir``, plus a PEFT adapter directory ``lora`` when given) is loaded once and
    kept; the tokenizer's chat template is applied with the generation prompt. With ``ids`` (one per
    conversation) each conversation samples with :func:`unit_seed` of its id, independent of the batch.
    """
    if not os.path.isdir(model_dir):
        raise SamplerUnavailableError(
            f"model directory not found: {model_dir!r}; pass --config.model_dir=CHECKPOINT, or generate with "
            "--config.generation.predictions=FILE or --config.generation.base_url=URL instead")
    sampler = _sampler_for(model_dir, lora)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if ids is None:
        return [c.text for c in sampler.chat(list(batch), params)]
    if len(ids) != len(batch):
        raise ValueError(f"jax_sampler_generate: {len(ids)} ids for {len(batch)} conversations")
    return [c.text for c in sampler.generate(list(batch), params, seeds=[unit_seed(seed, i) for i in ids])]


def jax_sampler_stream(model_dir: str, conversations: Sequence[list[dict[str, str]]], ids: Sequence[str], *,
                       temperature: float, top_p: float, max_new_tokens: int, seed: int, lora: str = "",
                       window: int = 32, lane_promotion: bool = True,
                       scan_layers="auto") -> Iterator[tuple[int, Any]]:
    """Answers chat conversations with our JAX sampler, yielding ``(position, Completion)`` as each finishes.

    At most ``window`` conversations are in the sampler at once (continuous batching): when one
    finishes it is yielded at once and the next conversation takes its place, so a caller that writes
    each answer as it arrives loses nothing already answered on a crash. Each conversation samples
    with :func:`unit_seed` of its id (the key :meth:`Sampler.generate` uses with ``seeds``), so the
    answers do not depend on the window or on the order of completion. ``lane_promotion`` sets the
    sampler's (rows move to longer KV-cache lanes as they grow; same answers); ``scan_layers`` is the cached
    sampler's layer loop (:func:`~iopo_jax.sampling.sampler.resolve_scan_layers`; same answers).
    """
    if not os.path.isdir(model_dir):
        raise SamplerUnavailableError(
            f"model directory not found: {model_dir!r}; pass --config.model_dir=CHECKPOINT, or generate with "
            "--config.generation.predictions=FILE or --config.generation.base_url=URL instead")
    if len(ids) != len(conversations):
        raise ValueError(f"jax_sampler_stream: {len(ids)} ids for {len(conversations)} conversations")
    if window < 1:
        raise ValueError(f"jax_sampler_stream: window must be >= 1, got {window}")
    sampler = _sampler_for(model_dir, lora, scan_layers)
    sampler.lane_promotion = bool(lane_promotion)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if not getattr(sampler, "continuous", True):  # a batch-level sampler: a window per call
        for start in range(0, len(conversations), window):
            idx = range(start, min(start + window, len(conversations)))
            done = sampler.generate([conversations[i] for i in idx], params,
                                    seeds=[unit_seed(seed, ids[i]) for i in idx])
            yield from zip(idx, done)
        return
    todo = list(range(len(conversations)))[::-1]  # popped from the end: file order
    running: list[Any] = []

    def admit():
        new = []
        while todo and len(running) + len(new) < window:
            i = todo.pop()
            where = f"request {ids[i]!r}"
            prompt_ids = sampler.encode(conversations[i], where=where)
            sampler.check_length(len(prompt_ids), max_new_tokens, where=where)
            new.append(Row(prompt_ids, params, unit_seed(seed, ids[i]), prompt_index=i, key_index=0))
        if new:  # longest first, as Sampler.generate does: long prompts start prefilling first
            sampler.submit(sorted(new, key=lambda r: -len(r.prompt_ids)))
            running.extend(new)

    try:
        admit()
        while running:
            if not sampler.step():
                raise RuntimeError(f"the sampler went idle with {len(running)} unfinished rows")
            done = [r for r in running if r.finished]
            running[:] = [r for r in running if not r.finished]
            admit()
            for r in done:
                yield r.prompt_index, r.completion()
    finally:
        if running:  # interrupted (or the consumer stopped): drop the rest, free the caches
            for r in running:
                r.cancelled = True
            sampler.reset_scheduler()


class JaxSamplerGenerator:
    """Answers from our JAX sampler, at most ``batch_size`` conversations in it at once; each answer is
    returned as soon as it finishes (see :func:`jax_sampler_stream`), with its finish reason and
    number of new tokens."""

    def __init__(self, model_dir: str, *, temperature: float, top_p: float, max_new_tokens: int,
                 batch_size: int, seed: int = 0, lora: str = "", lane_promotion: bool = True,
                 scan_layers="auto"):
        self.model_dir = model_dir
        self.name = f"jax:{model_dir}" + (f"+{lora}" if lora else "")
        self.kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, lora=lora,
                       lane_promotion=lane_promotion, scan_layers=scan_layers)
        self.batch_size = batch_size

    def generate(self, requests: Sequence[driver.GenRequest]) -> Iterator[driver.GenResult]:
        requests = list(requests)
        for i, c in jax_sampler_stream(self.model_dir, [r.messages for r in requests], [r.id for r in requests],
                                       window=self.batch_size, **self.kw):
            yield driver.GenResult(requests[i].id, c.text,
                                   meta={"finish_reason": c.finish_reason, "new_tokens": len(c.token_ids)})


# ---------------------------------------------------------------------------------------------------
# Backend selection from an evaluation config (configs/eval_*.py, fields in evaluation/config_defaults.py).

BACKENDS = ("predictions", "api", "jax")


def resolve_backend(config) -> str:
    """``config.generation.backend``, with "auto" resolved: predictions file, else API, else JAX sampler."""
    g = config.generation
    backend = g.backend
    if backend == "auto":
        if g.predictions:
            backend = "predictions"
        elif g.base_url:
            backend = "api"
        elif config.model_dir:
            backend = "jax"
        else:
            raise ValueError("no way to get answers: pass --config.generation.predictions=FILE, "
                             "--config.generation.base_url=URL --config.generation.model=NAME, "
                             "or --config.model_dir=CHECKPOINT")
    if backend not in BACKENDS:
        raise ValueError(f"config.generation.backend must be auto|{'|'.join(BACKENDS)}, got {backend!r}")
    if backend == "predictions" and not g.predictions:
        raise ValueError("generation.backend=predictions needs --config.generation.predictions=FILE")
    if backend == "api" and not (g.base_url and g.model):
        raise ValueError("generation.backend=api needs --config.generation.base_url=URL and "
                         "--config.generation.model=NAME")
    if backend == "jax" and not config.model_dir:
        raise ValueError("generation.backend=jax needs --config.model_dir=CHECKPOINT")
    return backend


# Keys of config.generation that are not ClientConfig fields: the choice of backend, the settings of the other
# backends and of the prompts, and max_new_tokens (sent to the server as max_tokens).
GENERATION_SETTINGS = ("backend", "predictions", "batch_size", "answer_template", "max_chars", "max_new_tokens",
                       "lane_promotion", "scan_layers")


def api_client_config(config, workdir: str) -> chat_client.ClientConfig:
    """``config.generation`` as the chat client settings of the "api" backend: its ClientConfig fields as they
    are (the others take ClientConfig's defaults; a key that is neither one nor in :data:`GENERATION_SETTINGS`
    fails, naming it), ``max_tokens`` = ``max_new_tokens``, the response store generation_cache.jsonl."""
    g = config.generation
    return from_mapping(chat_client.ClientConfig, g, "generation", GENERATION_SETTINGS, max_tokens=g.max_new_tokens,
                        store_path=os.path.join(workdir, "generation_cache.jsonl"), name="generation")


def make_generator(config, backend: str, workdir: str):
    """The generator of a resolved ``backend`` (see :func:`resolve_backend`)."""
    g = config.generation
    if backend == "predictions":
        return PredictionsFileGenerator(g.predictions)
    if backend == "api":
        return ChatAPIGenerator(api_client_config(config, workdir))
    try:
        scan_layers = resolve_scan_layers(g.scan_layers)
    except ValueError as e:
        raise ValueError(f"config.generation.scan_layers: {e}") from None
    return JaxSamplerGenerator(config.model_dir, temperature=g.temperature, top_p=g.top_p,
                               max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=config.seed,
                               lora=config.lora, lane_promotion=g.lane_promotion, scan_layers=scan_layers)


def model_name(config, backend: str) -> str:
    """The name of the answering model in reports: model_dir's folder, the API model or the predictions file."""
    if config.model_dir:
        return os.path.basename(os.path.normpath(config.model_dir))
    if backend == "api":
        return config.generation.model
    if backend == "predictions":
        return os.path.basename(config.generation.predictions)
    return "?"


def answers_label(config, backend: str) -> str:
    """The report's "answers" row: the backend, or the predictions file's name."""
    if backend == "predictions":
        return f"predictions file {os.path.basename(config.generation.predictions)}"
    return backend
