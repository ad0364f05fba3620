"""sha256 helpers: hex digests of text and files, integers (seeds, salts) derived from text.

The one place the project spells ``hashlib.sha256`` for these; cache keys and seeds built with them
must never change value, so each helper is exactly the expression it replaced (text is UTF-8 encoded;
integers are the first ``nbytes`` bytes of the digest, little endian).

Example::

    sha256_hex("a|b")[:16]                  # a short cache key
    sha256_int("layers.0.q_proj", 4)        # a 32-bit salt
    seed63("rl-rollout|0|7")                # a non-negative 63-bit seed
"""
from __future__ import annotations

import hashlib


def _bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def sha256_hex(text: str | bytes) -> str:
    """Hex sha256 of ``text`` (UTF-8) or of raw bytes."""
    return hashlib.sha256(_bytes(text)).hexdigest()


def sha256_file(path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_int(text: str | bytes, nbytes: int) -> int:
    """The first ``nbytes`` bytes of the sha256 of ``text`` as a little-endian unsigned integer."""
    return int.from_bytes(hashlib.sha256(_bytes(text)).digest()[:nbytes], "little")


def seed63(text: str | bytes) -> int:
    """A non-negative 63-bit seed from ``text`` (fits a signed int64 and numpy/JAX seeds)."""
    return sha256_int(text, 8) >> 1
