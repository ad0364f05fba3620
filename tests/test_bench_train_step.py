"""bench/train_step.py's batch fits any vocabulary (SmolLM2's 49,152 rows as well as Qwen2's 151,936)."""
import importlib.util
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("vocab,pad", [(49152, 49151), (151936, 151643), (1000, 999)])
def test_batch_ids_are_inside_the_vocabulary(bench, vocab, pad):
    b = bench.make_batch(2, 20, 8, vocab, seed=1)
    ids, seg = b["input_ids"], b["segment_ids"]
    assert ids.max() < vocab and ids.min() >= 0
    assert (ids[seg == 0] == pad).all() and (ids[seg > 0] != pad).all()
    assert ids.shape[0] == 8
    # the shared-prompt rows of the same groups pad with the same id (was Qwen2's 151,643 for every vocabulary)
    sp, sseg = b["sp_input_ids"], b["sp_segment_ids"]
    assert sp.shape[0] == 4 and sp.max() < vocab and sp.min() >= 0
    assert (sp[sseg == 0] == pad).all() and (sp[sseg > 0] != pad).all()
