"""One path abstraction for everything a run writes under ``--workdir``: local folders and object stores.

A workdir is either a local folder (made absolute) or a URI such as ``gs://bucket/run``. Both are
handled through :mod:`etils.epath` (which orbax uses for checkpoints too): for ``gs://`` it goes through
``gcsfs`` (or ``tf.io.gfile`` when TensorFlow is installed). Object stores have no append and no
rename, so:

* small files (``summary.json``, caches, plots) are written whole, in one object upload, which is
  atomic on GCS (readers see the old object or the new one, never half of it); locally through a
  temporary file and ``os.replace``;
* ``metrics.jsonl`` is appended locally; on an object store the whole object is rewritten at each
  flush (the file is small: one line per logged step);
* TensorBoard event files on an object store are buffered and the whole object rewritten at each
  flush (the same scheme as tensorboardX's own GCS writer), through epath;
* exports (safetensors shards + JSON) are written into a local temporary folder and copied up.

Example::

    wd = workdir_path("gs://bucket/run")        # or a local path
    write_text(wd / "summary.json", "{}")
    with local_dir_for(wd / "export" / "adapter") as d:
        ...write files into the local folder d...   # copied to gs://bucket/run/export/adapter after
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile

import numpy as np
from etils import epath


def cache_root() -> str:
    """The local folder for iopo-jax's caches (compiled programs, kernels, wheels, NLTK data):
    ``$IOPO_JAX_CACHE``, else ``$XDG_CACHE_HOME/iopo_jax``, else ``~/.cache/iopo_jax``."""
    if os.environ.get("IOPO_JAX_CACHE"):
        return os.environ["IOPO_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "iopo_jax")


def is_remote(path) -> bool:
    """True for URIs with a scheme (``gs://``, ``s3://``...); False for local paths."""
    return "://" in os.fspath(path)


def workdir_path(path) -> epath.Path:
    """``path`` as an :class:`epath.Path`: local paths made absolute (``~`` expanded), URIs kept."""
    s = os.fspath(path)
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def makedirs(path) -> epath.Path:
    p = workdir_path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a reader never sees a partial file."""
    p = workdir_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        p.write_bytes(data)  # one object upload: atomic on GCS
        return
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=os.fspath(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_png(path, fig, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG file, written atomically (see :func:`write_bytes`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes(path, buf.getvalue())


def save_npz(path, **arrays) -> None:
    """``np.savez`` written atomically (see :func:`write_bytes`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def load_npz(path) -> dict:
    with workdir_path(path).open("rb") as f:
        z = np.load(io.BytesIO(f.read()))
        return {k: z[k] for k in z.files}


def upload_dir(local: str, dst) -> None:
    """Copies the files of the local folder ``local`` (recursively) to ``dst``."""
    dst = workdir_path(dst)
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        target = dst if rel == "." else dst / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                (target / name).write_bytes(f.read())


@contextlib.contextmanager
def local_dir_for(path):
    """Yields a local folder to write ``path``'s files into: ``path`` itself when local; otherwise a
    temporary folder whose files are copied to ``path`` when the block ends without error."""
    p = workdir_path(path)
    if not is_remote(p):
        os.makedirs(os.fspath(p), exist_ok=True)
        yield os.fspath(p)
        return
    tmp = tempfile.mkdtemp(prefix="iopo_upload_")
    try:
        yield tmp
        if os.listdir(tmp):
            upload_dir(tmp, p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AppendFile:
    """A text file appended line by line: a plain appended file locally; on an object store (no append)
    the existing object is read once and the whole object rewritten at each :meth:`flush`."""

    def __init__(self, path):
        self.path = workdir_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remote = is_remote(self.path)
        if self.remote:
            self._buf = io.StringIO()
            if self.path.exists():
                self._buf.write(self.path.read_text())
            self._dirty = False
            self._f = None
        else:
            self._f = open(os.fspath(self.path), "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if self.remote:
            self._buf.write(text)
            self._dirty = True
        else:
            self._f.write(text)

    def flush(self) -> None:
        if self.remote:
            if self._dirty:
                self.path.write_text(self._buf.getvalue())
                self._dirty = False
        else:
            self._f.flush()

    def close(self) -> None:
        self.flush()
        if self._f is not None:
            self._f.close()


class _EpathRecordWriter:
    """tensorboardX record writer for object stores through epath: buffers the event file and rewrites
    the whole object at each flush."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    def open(self, path):
        return _EpathRecordWriter(path)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def summary_writer(logdir):
    """A tensorboardX ``SummaryWriter`` for ``logdir`` (local or an object-store URI via epath)."""
    from tensorboardX import SummaryWriter

    s = os.fspath(logdir)
    if is_remote(s):
        from tensorboardX import record_writer

        record_writer.register_writer_factory(s.split("://", 1)[0], _EpathRecordWriterFactory())
    return SummaryWriter(s)
