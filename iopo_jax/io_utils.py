"""Crash-safe JSONL files: tolerant reading, durable appending, atomic rewriting.

Every evaluation artefact that grows during a run (the judge response store, predictions.jsonl,
judgments.jsonl) is an append-only JSONL file written through :class:`JsonlAppender`:

* each record is one ``json.dumps`` line followed by ``\\n``, written with a single ``write`` call and
  flushed to the OS at once, so a process killed with SIGKILL loses at most the line being written;
* ``fsync`` is issued at most every ``fsync_interval_s`` seconds (0 = after every line), which bounds
  what a power loss can take without making every request pay for a disk sync;
* on open, a torn last line left by a crash is cut off before anything new is appended.

:func:`read_jsonl` reads such a file back, skipping (with a warning) a torn final line and raising a
:class:`ValueError` naming file and line for damage anywhere else.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)


def read_jsonl(path: str, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Reads a JSONL file written by :class:`JsonlAppender`.

    Args:
      path: the file.
      missing_ok: return ``[]`` when the file does not exist (else raise FileNotFoundError).

    Returns:
      The records, in file order. A final line that is not valid JSON (a write torn by a crash) is
      skipped with a warning; an invalid line anywhere else raises ``ValueError`` naming file and line.
    """
    if "://" in str(path):  # an object-store URI (a gs:// workdir): read through etils.epath
        from etils import epath

        p = epath.Path(path)
        if not p.exists():
            if missing_ok:
                return []
            raise FileNotFoundError(path)
        data = p.read_bytes()
    else:
        if not os.path.exists(path):
            if missing_ok:
                return []
            raise FileNotFoundError(path)
        with open(path, "rb") as f:
            data = f.read()
    lines = data.split(b"\n")
    records = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        torn_tail = lineno == len(lines) and not data.endswith(b"\n")
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn_tail:
                logger.warning("%s:%d: skipping a torn last line (%d bytes) left by an interrupted write",
                               path, lineno, len(raw))
                continue
            raise ValueError(f"{path}:{lineno}: invalid JSON line: {e}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _repair_tail(path: str) -> None:
    """Cuts a torn last line (no trailing newline) off ``path`` so appends start on a fresh line."""
    if not os.path.exists(path):
        return
    size = os.path.getsize(path)
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan backwards for the last newline.
        pos = size
        chunk = 4096
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                cut = start + idx + 1
                break
            pos = start
        logger.warning("%s: cutting %d bytes of a torn last line left by an interrupted write",
                       path, size - cut)
        f.truncate(cut)


class JsonlAppender:
    """Thread-safe, crash-safe appender of JSON records to a file (see module docstring)."""

    def __init__(self, path: str, *, fsync_interval_s: float = 1.0):
        self.path = path
        self.fsync_interval_s = fsync_interval_s
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        _repair_tail(path)
        self._f = open(path, "ab")
        self._lock = threading.Lock()
        self._last_sync = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._f.write(line)
            self._f.flush()
            now = time.monotonic()
            if now - self._last_sync >= self.fsync_interval_s:
                os.fsync(self._f.fileno())
                self._last_sync = now

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Writes ``records`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def iter_nonempty_lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line
