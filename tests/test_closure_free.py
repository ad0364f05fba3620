"""No compiled function closes over an array: every step of training, reference precomputation,
evaluation and RL takes the model state as arguments (issue 11 item 1). Checked by lowering each step of
the real Trainer / RLTrainer with JAX's captured-constant report set to a few KB, and by the step specs
(abstract arguments) an ahead-of-time compile uses."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iopo_jax.trainer import Trainer, abstract_train_specs
from iopo_jax.rl.loop import RLTrainer

from test_trainer import small_config, small_iopo_file  # noqa: F401  (fixture)
from test_rl_loop import prompts_file, rl_config  # noqa: F401  (fixture)

LIMIT = 4096  # bytes: scalars and small tables (RoPE frequencies) are fine, weights are not


def captured(spec) -> tuple[int, list[str]]:
    """(bytes of constants in the traced program, JAX's captured-constant warnings) for one step spec."""
    with warnings.catch_warnings(record=True) as w, jax.captured_constants_warn_bytes(LIMIT) \
            if hasattr(jax, "captured_constants_warn_bytes") else _config(LIMIT):
        warnings.simplefilter("always")
        traced = spec.fn.trace(*spec.args)
        traced.lower()
    consts = sum(int(getattr(c, "nbytes", 0)) for c in traced.jaxpr.consts)
    return consts, [str(x.message) for x in w if "onstant" in str(x.message)]


class _config:
    def __init__(self, v):
        self.v = v

    def __enter__(self):
        self.old = jax.config.jax_captured_constants_warn_bytes
        jax.config.update("jax_captured_constants_warn_bytes", self.v)

    def __exit__(self, *a):
        jax.config.update("jax_captured_constants_warn_bytes", self.old)


def test_detector_sees_a_closed_over_array():
    """The check can fail: a jitted function closing over 1 MB is reported."""
    from iopo_jax.trainer import StepSpec

    big = jnp.ones((512, 512), jnp.float32)
    spec = StepSpec("closure", jax.jit(lambda x: x @ big), (jax.ShapeDtypeStruct((4, 512), jnp.float32),))
    nbytes, warns = captured(spec)
    assert nbytes >= big.nbytes or warns


def _check_specs(specs, names):
    assert set(names) <= set(specs)
    for name, spec in specs.items():
        leaves = jax.tree_util.tree_leaves(spec.args)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), name
        nbytes, warns = captured(spec)
        assert nbytes <= LIMIT and not warns, (name, nbytes, warns)


@pytest.mark.parametrize("finetune", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_trainer_steps_capture_no_arrays(tiny_model_dir, small_iopo_file, tmp_path, finetune):  # noqa: F811
    cfg = small_config(tiny_model_dir, small_iopo_file, model__finetune=finetune, objective__reference="online")
    tr = Trainer(cfg, str(tmp_path / "run"), devices=jax.devices()[:2], progress=False).setup()
    specs = tr.step_specs(rows=8, seq_len=64)
    # the frozen weights (base model, here 151,936 x 64 embeddings) are an argument of every model step
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(specs["micro_step"].args[0]))
    assert state_bytes > 10 * 2 ** 20
    _check_specs(specs, ["micro_step", "apply_step", "eval_step", "ref_step"])


@pytest.mark.slow
def test_rl_steps_capture_no_arrays(tiny_model_dir, prompts_file, tmp_path):  # noqa: F811
    cfg = rl_config(tiny_model_dir, prompts_file)
    tr = RLTrainer(cfg, str(tmp_path / "rl"), devices=jax.devices()[:2], progress=False).setup()
    _check_specs(tr.step_specs(rows=2, seq_len=64), ["logps", "ref_logps", "grad_step", "apply_step"])
    # the sampler's compiled programs take the weights as an argument as well: a rollout under the
    # captured-constant report at a few KB warns about nothing
    with warnings.catch_warnings(record=True) as w, _config(LIMIT):
        warnings.simplefilter("always")
        m = tr.iteration(0)
    assert np.isfinite(m["loss"])
    assert not [x for x in w if "onstant" in str(x.message)], [str(x.message)[:300] for x in w]


def test_abstract_specs_without_weights(tiny_model_dir, small_iopo_file):  # noqa: F811
    """``abstract_train_specs`` builds every step from the config alone (no weights or data read) on a
    mesh, for ahead-of-time compilation."""
    from iopo_jax.sharding import make_mesh

    cfg = small_config(tiny_model_dir, small_iopo_file, objective__reference="precompute")
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    specs = abstract_train_specs(cfg, mesh, rows=8, seq_len=64)
    emb = [x for x in jax.tree_util.tree_leaves(specs["micro_step"].args[0]) if x.shape == (151936, 64)]
    assert emb and all(x.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp") for x in emb)
    assert "ref_logps" in specs["micro_step"].args[3]
    _check_specs(specs, ["micro_step", "apply_step", "eval_step", "ref_step"])
