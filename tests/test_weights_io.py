"""Checkpoint reading: positioned reads of sub-boxes, the abstract model, sharded loads equal the file."""
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import iopo_jax.models.safetensors_io as S
import iopo_jax.models.weights as W
from iopo_jax.models import ModelConfig, Transformer, export_hf, load_model
from iopo_jax.models.config import LoRAConfig
from iopo_jax.sharding import make_mesh, param_spec, path_str
from iopo_jax.tools.make_tiny_model import tiny_config

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture()
def tensors_file(tmp_path):
    rng = np.random.RandomState(0)
    tensors = {
        "mat": rng.randn(37, 12).astype(np.float32),
        "cube": rng.randn(9, 4, 6).astype(np.float32),
        "vec": rng.randn(10).astype(np.float32),
        "scalar": np.asarray(3.5, np.float32),
        "half": rng.randn(20, 8).astype(BF16),
        "empty": np.zeros((0, 5), np.float32),
    }
    path = str(tmp_path / "t.safetensors")
    S.write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
    return path, tensors


def _sl(box):
    return tuple(slice(a, b) for a, b in box)


BOXES = {
    "mat": [((0, 37), (0, 12)), ((5, 19), (0, 12)), ((0, 37), (4, 8)), ((3, 30), (0, 6)), ((36, 37), (11, 12)),
            ((0, 10), (0, 3)), ((30, 37), (0, 3))],
    "cube": [((0, 9), (0, 4), (0, 6)), ((2, 5), (1, 3), (0, 6)), ((0, 9), (0, 4), (3, 6))],
    "vec": [((0, 10),), ((4, 7),)],
    "scalar": [()],
    "half": [((0, 20), (0, 8)), ((1, 11), (4, 8))],
    "empty": [((0, 0), (0, 5))],
}


@pytest.mark.parametrize("how", ["preadv", "short_reads", "no_preadv"])
def test_read_boxes_equal_numpy_slices(tensors_file, monkeypatch, how):
    """Every box, in the file's dtype and cast, equals numpy slicing; fresh 64-byte aligned buffers.
    Also with reads split into 7-byte calls, and through the seek + readinto fallback (no preadv)."""
    if how == "short_reads":
        monkeypatch.setattr(S, "_MAX_READ", 7)
    if how == "no_preadv":
        monkeypatch.delattr(os, "preadv", raising=False)
    path, tensors = tensors_file
    st = S.SafetensorsFile(path)
    try:
        results = []
        for name, boxes in BOXES.items():
            for dtype in (tensors[name].dtype, np.dtype(np.float32), BF16):
                results.append((name, boxes, dtype, st.read(name, boxes, dtype)))
        st.close()  # the copies must not depend on the file or its memory map
        for name, boxes, dtype, got in results:
            for box, g in zip(boxes, got):
                want = tensors[name][_sl(box)].astype(dtype)
                assert g.dtype == dtype and g.shape == want.shape, (name, box)
                np.testing.assert_array_equal(g.astype(np.float32), want.astype(np.float32), err_msg=f"{name} {box}")
                assert g.size == 0 or g.ctypes.data % 64 == 0
                assert g.flags.c_contiguous and g.flags.writeable
    finally:
        st.close()


def test_index_box_normalises_jax_indices():
    assert S.index_box((slice(None), slice(4, 8)), (10, 12)) == ((0, 10), (4, 8))
    assert S.index_box((), (3, 2)) == ((0, 3), (0, 2))
    assert S.index_box((slice(2, None),), (5,)) == ((2, 5),)
    with pytest.raises(ValueError, match="strided"):
        S.index_box((slice(0, 10, 2),), (10,))


def test_read_of_a_file_truncated_after_opening_names_tensor(tensors_file):
    path, _ = tensors_file
    st = S.SafetensorsFile(path)
    try:
        os.truncate(path, st.data_start + 16)  # only part of the first tensor remains
        with pytest.raises(S.CheckpointError, match=r"t\.safetensors.*unexpected end of file.*tensor 'mat'"):
            st.read("mat", [((0, 37), (0, 12))], np.float32)
    finally:
        st.close()


def _tree_items(state):
    out = {}
    jax.tree_util.tree_map_with_path(lambda p, x: out.__setitem__(path_str(p), x), nnx.to_pure_dict(state))
    return out


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4, alpha=8.0, dropout=0.1)], ids=["base", "lora_dropout"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_abstract_model_matches_traced_init(lora, tie):
    """Transformer(abstract=True) has the real init's graph, paths, shapes, dtypes and RNG state."""
    cfg = tiny_config("qwen2", vocab_size=500, tie_word_embeddings=tie).replace(lora=lora)
    g_abs, p_abs, rest_abs = W.abstract_model(cfg)
    real = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
    g_real, p_real, _ = nnx.split(real, nnx.Param, ...)
    assert g_abs == g_real
    a, r = _tree_items(p_abs), _tree_items(p_real)
    assert sorted(a) == sorted(r)
    for k in a:
        assert isinstance(a[k], jax.ShapeDtypeStruct), k
        assert (a[k].shape, a[k].dtype) == (r[k].shape, r[k].dtype), k
    rng_leaves = jax.tree_util.tree_leaves(rest_abs)
    assert bool(rng_leaves) == (lora is not None)  # real dropout streams only when LoRA dropout is on
    assert all(isinstance(x, jax.Array) for x in rng_leaves)


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory):
    """One small untied Qwen2-shaped model exported in float32 and in bfloat16."""
    cfg = tiny_config("qwen2", vocab_size=1000, hidden_size=64, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=False)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    out = {}
    for dt in ("float32", "bfloat16"):
        d = str(tmp_path_factory.mktemp(f"ckpt_{dt}"))
        export_hf(model, d, dtype=dt, max_shard_bytes=100_000)  # several shard files
        out[dt] = d
    return out


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 1}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["no_mesh", "fsdp1", "fsdp8", "fsdp4xtp2", "dp2xfsdp2xtp2"])
@pytest.mark.parametrize("file_dtype,param_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                                    ("bfloat16", "bfloat16")])
def test_sharded_load_equals_file(small_ckpts, mesh_shape, file_dtype, param_dtype):
    """Every parameter is bitwise the file's tensor (cast to param_dtype), with its NamedSharding."""
    d = small_ckpts[file_dtype]
    mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))]) if mesh_shape else None
    model, cfg = load_model(d, mesh=mesh, param_dtype=param_dtype)
    ckpt = S.Checkpoint(d)
    try:
        params = W.base_params(model)
        for ours, (hf_key, _) in W.expand_map(cfg).items():
            arr = params[ours]
            want = np.asarray(ckpt.get(hf_key)).astype(param_dtype)
            assert arr.dtype == np.dtype(param_dtype), ours
            np.testing.assert_array_equal(np.asarray(arr).astype(np.float32), want.astype(np.float32), err_msg=ours)
            if mesh is not None:
                assert arr.sharding == NamedSharding(mesh, param_spec(ours, arr.shape, mesh)), ours
    finally:
        ckpt.close()


def test_weight_rule_transform_is_applied(small_ckpts, monkeypatch):
    """A WeightRule with to_ours (a family whose layout differs) is applied before slicing."""
    d = small_ckpts["float32"]
    rules = list(W.WEIGHT_MAP)
    i = next(j for j, r in enumerate(rules) if r.ours == "norm.scale")
    rules[i] = W.WeightRule(rules[i].hf, rules[i].ours, to_ours=lambda a: a[::-1] * 2)
    monkeypatch.setattr(W, "WEIGHT_MAP", rules)
    model, _ = load_model(d, mesh=make_mesh({"fsdp": 8}))
    ckpt = S.Checkpoint(d)
    try:
        np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), ckpt.get("model.norm.weight")[::-1] * 2)
    finally:
        ckpt.close()


def test_abstract_model_of_7b_config_allocates_nothing():
    """A 7B-shaped abstract model is ShapeDtypeStructs only (no 30 GB of float32 arrays)."""
    cfg = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, head_dim=128)
    _, params, _ = W.abstract_model(cfg)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert 7.0e9 < sum(int(np.prod(x.shape)) for x in leaves) < 8.0e9


def test_read_threads_and_progress_bar_give_the_same_model(small_ckpts, capsys):
    """1 reading thread and 4 (results placed in order) load the same bits; progress=True draws a bar."""
    d = small_ckpts["bfloat16"]
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    one, cfg = load_model(d, mesh=mesh, threads=1, progress=False)
    assert "loading weights" not in capsys.readouterr().err
    four, _ = load_model(d, mesh=mesh, threads=4, progress=True)
    assert "loading weights" in capsys.readouterr().err
    a, b = W.base_params(one), W.base_params(four)
    assert sorted(a) == sorted(b) == sorted(W.expand_map(cfg))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
        assert a[k].sharding == b[k].sharding
