"""Partition specs: an axis that does not divide a parameter dimension is replicated with one warning per
(parameter, axis), or raises in strict mode; the host <-> device helpers round-trip."""
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from iopo_jax import sharding as S


@pytest.fixture()
def mesh():
    return S.make_mesh({"fsdp": 4, "tensor": 2}, jax.devices()[:8])


def test_dividing_axes_shard_silently(mesh, caplog):
    with caplog.at_level(logging.WARNING, logger="iopo_jax.sharding"):
        assert S.param_spec("layers.0.self_attn.q_proj.weight", (64, 32), mesh) == P("tensor", "fsdp")
    assert not caplog.records


def test_non_dividing_axis_is_replicated_with_one_warning(mesh, caplog):
    S._REPLICATED_WARNED.clear()
    path = "layers.0.self_attn.k_proj.weight"
    with caplog.at_level(logging.WARNING, logger="iopo_jax.sharding"):
        for _ in range(3):
            assert S.param_spec(path, (64, 30), mesh) == P("tensor", None)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert path in msg and "'fsdp'" in msg and "(30)" in msg


def test_strict_raises_naming_parameter_and_axis(mesh):
    with pytest.raises(S.ShardingError, match=r"lm_head\.weight.*'tensor'.*dimension 0 \(7\)"):
        S.param_spec("lm_head.weight", (7, 32), mesh, strict=True)


def test_batch_specs_drop_silently(mesh, caplog):
    with caplog.at_level(logging.WARNING, logger="iopo_jax.sharding"):
        assert S.batch_sharding(mesh, 2, (3, 5)).spec == P(None, None)
    assert not caplog.records


def test_put_and_host_round_trip(mesh):
    x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    g = S.put_global(x, mesh)
    assert g.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(S.host_value(g), x)
    local = S.put_local_rows(x, mesh)  # one process: its rows are the whole batch
    assert local.shape == x.shape and local.sharding == g.sharding
    np.testing.assert_array_equal(S.host_local_rows(local), x)
    np.testing.assert_array_equal(S.host_value(S.put_global(x, None)), x)
