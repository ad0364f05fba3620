"""Crash-safe JSONL helpers; they live in :mod:`iopo_jax.io_utils` (the library may not import this
package), re-exported here so ``from evaluation import io_utils`` keeps working."""
from iopo_jax.io_utils import *  # noqa: F401,F403
from iopo_jax.io_utils import JsonlAppender, read_jsonl  # noqa: F401  (explicit for readers and linters)
