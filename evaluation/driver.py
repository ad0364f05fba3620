"""Resumable generation and judging loops shared by the benchmarks.

Both loops work on *units* with stable string ids and keep one append-only JSONL file in the workdir:

* :func:`run_generation` writes ``predictions.jsonl`` (``{"id", "response", ...}``, one line per unit).
  A unit may need several model calls (``GenUnit.parts``, e.g. an EIFBench instance split in two
  halves); its line is written once all parts are answered, the answers joined by ``joiner``.
* :func:`run_judging` writes ``judgments.jsonl`` (one line per judge unit). A judge reply that the
  benchmark's parser rejects is asked again (a fresh *attempt*, its own key in the response store) up
  to ``max_parse_retries`` times, then recorded with status ``unparseable``. Transport failures and a
  spent budget are recorded with status ``error``.

On a rerun, ``ok`` and ``unparseable`` lines are final and their units are skipped; ``error`` lines
are retried. Replies already in the judge's response store are reused without a request, so a run
killed at any point (even SIGKILL) continues without losing or repeating a judgment. At the end of a
loop the file is rewritten atomically in unit order with one line per unit (deterministic content).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

from data_pipeline import load_records
from iopo_jax import io_utils
from iopo_jax import chat_client

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
FINAL_STATUSES = ("ok", "unparseable")


@dataclasses.dataclass
class GenUnit:
    id: str
    parts: list[Messages]  # chat messages of each model call; answers are joined in this order


@dataclasses.dataclass
class GenRequest:
    id: str  # "<unit id>#<part>"
    messages: Messages


@dataclasses.dataclass
class GenResult:
    id: str
    text: Optional[str] = None
    error: Optional[str] = None
    meta: Optional[dict[str, Any]] = None  # e.g. {"finish_reason", "new_tokens"}; kept in the record (one-part units)


class Generator(Protocol):
    """A generation backend (see :mod:`evaluation.generate`)."""

    name: str
    # Optional attribute ``whole_units = True``: the backend answers whole units (parts are not split).

    def generate(self, requests: Sequence[GenRequest]) -> Iterator[GenResult]:
        """Yields one result per request, in any order, as soon as each is ready."""


@dataclasses.dataclass
class JudgeUnit:
    id: str
    messages: Messages
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the judgment line


@dataclasses.dataclass
class Parsed:
    ok: bool
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""  # why a reply was rejected


ParseFn = Callable[[JudgeUnit, str], Parsed]


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True, leave=True)


def load_final(path: str, key: str = "id") -> dict[str, dict[str, Any]]:
    """Last record per id from a judgments/predictions file (ignores ``error`` judgment lines)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in io_utils.read_jsonl(path):
        if rec.get("status", "ok") not in FINAL_STATUSES:
            continue
        out.setdefault(str(rec[key]), rec)  # first final record wins: a final result is never replaced
    return out


def _compact(path: str, order: Sequence[str], extra: dict[str, dict[str, Any]]) -> None:
    """Rewrites ``path``: one line per id in ``order`` (final lines first, else the latest error)."""
    final: dict[str, dict[str, Any]] = {}
    latest: dict[str, dict[str, Any]] = {}
    for rec in io_utils.read_jsonl(path):
        rid = str(rec.get("id"))
        if rec.get("status", "ok") in FINAL_STATUSES:
            final.setdefault(rid, rec)
        else:
            latest[rid] = rec
    latest.update(extra)
    rows = []
    for uid in order:
        if uid in final:
            rows.append(final[uid])
        elif uid in latest:
            rows.append(latest[uid])
    io_utils.write_jsonl_atomic(path, rows)


def run_generation(units: Sequence[GenUnit], generator: Generator, path: str, *, joiner: str = "\n\n",
                   progress: bool = True, extra_fields: Optional[dict[str, Any]] = None
                   ) -> tuple[dict[str, str], dict[str, int]]:
    """Generates (or reads) an answer for every unit, appending to ``path`` as answers complete.

    Returns:
      ({unit id: response}, stats) where stats counts ``reused`` (already in ``path``), ``generated``,
      ``failed`` (a part raised; retried on the next run) and ``missing`` (the backend has no answer,
      e.g. a predictions file without that id).
    """
    existing = load_final(path)
    out = {uid: rec["response"] for uid, rec in existing.items() if isinstance(rec.get("response"), str)}
    pending = [u for u in units if u.id not in out]
    stats = {"reused": len(units) - len(pending), "generated": 0, "failed": 0, "missing": 0}
    if not pending:
        return {u.id: out[u.id] for u in units if u.id in out}, stats
    whole = bool(getattr(generator, "whole_units", False))
    if whole:  # the backend holds whole answers (a predictions file): one request per unit
        pending = [GenUnit(u.id, u.parts[:1]) for u in pending]
    requests = [GenRequest(f"{u.id}#{p}", msgs) for u in pending for p, msgs in enumerate(u.parts)]
    by_unit = {u.id: u for u in pending}
    parts: dict[str, dict[int, str]] = {u.id: {} for u in pending}
    failed: set[str] = set()
    seen: set[str] = set()
    metas: dict[str, dict[str, Any]] = {}
    bar = progress_bar(len(pending), f"generating ({generator.name})", progress)
    with io_utils.JsonlAppender(path) as app:
        for res in generator.generate(requests):
            uid, _, p = res.id.rpartition("#")
            seen.add(res.id)
            if uid in failed:
                continue
            if res.text is None:
                failed.add(uid)
                logger.error("generation failed for %s: %s", uid, res.error)
                bar.update(1)
                continue
            parts[uid][int(p)] = res.text
            if res.meta and len(by_unit[uid].parts) == 1:
                metas[uid] = res.meta
            unit = by_unit[uid]
            if len(parts[uid]) == len(unit.parts):
                text = joiner.join(parts[uid][i] for i in range(len(unit.parts)))
                rec = {"id": uid, "response": text}
                if len(unit.parts) > 1:
                    rec["parts"] = [parts[uid][i] for i in range(len(unit.parts))]
                if uid in metas:
                    rec.update(metas[uid])
                if extra_fields:
                    rec.update(extra_fields)
                app.append(rec)
                out[uid] = text
                stats["generated"] += 1
                bar.update(1)
    bar.close()
    stats["failed"] = len(failed)
    missing = [u.id for u in pending if u.id not in out and u.id not in failed]
    stats["missing"] = len(missing)
    if missing:
        logger.warning("no answer for %d of %d units (first: %s)", len(missing), len(units), missing[:5])
    return {u.id: out[u.id] for u in units if u.id in out}, stats


def run_judging(units: Sequence[JudgeUnit], client: chat_client.ChatClient, parse_fn: ParseFn, path: str, *,
                max_parse_retries: int = 2, concurrency: int = 8, progress: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Judges every unit (see module docstring) and returns ``{unit id: judgment record}``."""
    done = load_final(path)
    pending = [u for u in units if u.id not in done]
    results: dict[str, dict[str, Any]] = {u.id: done[u.id] for u in units if u.id in done}
    if done:
        logger.info("judging: %d of %d units already judged in %s; %d to go", len(results), len(units),
                    path, len(pending))
    if not pending:
        _compact(path, [u.id for u in units], {})
        return results

    def work(unit: JudgeUnit) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": unit.id, **unit.meta}
        last_text = None
        for attempt in range(max_parse_retries + 1):
            try:
                res = client.complete(unit.messages, attempt=attempt)
            except chat_client.ChatError as e:
                rec.update(status="error", attempts=attempt + 1, error=str(e))
                return rec
            last_text = res.text
            parsed = parse_fn(unit, res.text)
            if parsed.ok:
                rec.update(status="ok", attempts=attempt + 1, judge_key=res.key, judge_output=res.text,
                           **parsed.fields)
                return rec
            if attempt < max_parse_retries:
                logger.warning("judge reply for %s unparseable (%s); asking again (%d/%d)", unit.id,
                               parsed.reason, attempt + 1, max_parse_retries)
            else:
                logger.warning("judge reply for %s unparseable (%s) after %d tries; counted as unparseable",
                               unit.id, parsed.reason, attempt + 1)
        rec.update(status="unparseable", attempts=max_parse_retries + 1, judge_output=last_text)
        return rec

    errors: dict[str, dict[str, Any]] = {}
    bar = progress_bar(len(pending), "judging", progress)
    pool = cf.ThreadPoolExecutor(max_workers=max(1, int(concurrency)), thread_name_prefix="judge")
    try:
        with io_utils.JsonlAppender(path) as app:
            futures = [pool.submit(work, u) for u in pending]
            for fut in cf.as_completed(futures):
                rec = fut.result()
                app.append(rec)
                if rec["status"] == "error":
                    errors[rec["id"]] = rec
                results[rec["id"]] = rec
                bar.update(1)
    except BaseException:
        client.abort()  # Ctrl-C: stop retry loops at once; what is stored stays stored
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    if errors:
        logger.warning("judging: %d units failed (judge errors; excluded from metrics, retried on rerun)",
                       len(errors))
    _compact(path, [u.id for u in units], errors)
    return results


def iter_batches(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), max(1, n)):
        yield seq[i:i + n]


def load_with_ids(kind: str, path: str, id_field: str, limit: int = 0) -> list[dict[str, Any]]:
    """Records of ``kind`` read (and validated) by ``data_pipeline.load_records``, each given a string ``id``
    taken from ``id_field``; the first ``limit`` of them when ``limit`` > 0."""
    records, _ = load_records(kind, path)
    for r in records:
        r["id"] = str(r[id_field])
    return records[:limit] if limit else records


def user_prompt_units(records: Sequence[dict[str, Any]]) -> list["GenUnit"]:
    """One generation unit per record: its ``prompt`` as the only user message (the model's chat template
    supplies its default system prompt, as lm-eval does with a chat template)."""
    return [GenUnit(id=r["id"], parts=[[{"role": "user", "content": r["prompt"]}]]) for r in records]
