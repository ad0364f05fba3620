"""Training through the real entry points: LoRA-only updates, reference log-probs, devices, resume, NaN."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from iopo_jax.trainer import Trainer, TrainingDiverged, device_batch, forward_logps
from iopo_jax.models import load_model
from iopo_jax.models.weights import base_params

from conftest import DEMO_DIR, REPO


@pytest.fixture(scope="module")
def small_iopo_file(tmp_path_factory):
    groups = json.load(open(DEMO_DIR / "iopo_train.json"))[:20]
    p = tmp_path_factory.mktemp("data") / "iopo_small.json"
    p.write_text(json.dumps(groups, ensure_ascii=False))
    return str(p)


def small_config(model_dir, data_file, **kw):
    c = get_config()
    c.model.path = model_dir
    c.model.dtype = "float32"
    c.data.train_files = (data_file,)
    c.data.val_count = 4
    c.data.val_fraction = 0.0
    c.data.cutoff_len = 256
    c.data.batch_size = 2
    c.data.num_epochs = 1
    c.objective.name = "iopo"
    c.optimizer.lr = 1e-2
    c.optimizer.grad_accum = 2
    c.train.max_steps = 3
    c.train.eval_every = 0
    c.train.logprob_chunk = 32
    c.train.plot = False
    c.train.tensorboard = False
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.export.peft = False
    for k, v in kw.items():
        sec, field = k.split("__")
        c[sec][field] = v
    return c


def test_lora_only_updates_and_reference(tiny_model_dir, small_iopo_file, tmp_path):
    cfg = small_config(tiny_model_dir, small_iopo_file)
    tr = Trainer(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False).setup()
    before_base = {k: np.asarray(v) for k, v in base_params(tr.parts.merge(tr.trainable)).items()}
    before_lora = {k: np.asarray(v) for k, v in tr.trainable.items()}
    assert all(k.endswith(("lora_a", "lora_b")) for k in before_lora)

    # Reference == policy at step 0 (B = 0) == the base model without LoRA.
    batch = next(iter(tr.data.train))
    db = device_batch(batch, tr.mesh)
    ref = np.asarray(tr.ref_step(tr.trainable, db))
    pol = np.asarray(forward_logps(tr.parts.merge(tr.trainable), db, 32).logp_sum)
    base, _ = load_model(tiny_model_dir, dtype="float32")
    plain = np.asarray(forward_logps(base, db, 32).logp_sum)
    # Same values up to float32 rounding of differently fused programs (jit vs eager).
    np.testing.assert_allclose(ref, pol, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ref, plain, rtol=1e-6, atol=0)

    result = tr.run()
    assert result["steps"] == 3
    after_base = base_params(tr.parts.merge(tr.trainable))
    for k, v in before_base.items():
        np.testing.assert_array_equal(np.asarray(after_base[k]), v, err_msg=f"base weight {k} changed")
    changed = [k for k, v in tr.trainable.items() if not np.array_equal(np.asarray(v), before_lora[k])]
    assert any(k.endswith("lora_b") for k in changed) and any(k.endswith("lora_a") for k in changed)
    # The reference stays the base model after training.
    ref_after = np.asarray(tr.ref_step(tr.trainable, db))
    np.testing.assert_allclose(ref_after, plain, rtol=1e-6, atol=0)
    pol_after = np.asarray(forward_logps(tr.parts.merge(tr.trainable), db, 32).logp_sum)
    assert np.abs(pol_after - plain).max() > 1e-4
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3]
    assert "rewards/accuracies_v1" in lines[-2] and "tokens_per_s" in lines[-2]


@pytest.mark.slow  # ~2 min each on 2 cores; heavy to keep .ci/run under an hour (the 2-process CLI tests in CI
@pytest.mark.heavy  # compare a sharded run with another device layout end to end)
@pytest.mark.parametrize("mesh", [{"data": 2, "fsdp": 4, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2}],
                         ids=["data2xfsdp4", "fsdp4xtensor2"])
def test_same_losses_on_1_and_8_devices(tiny_model_dir, small_iopo_file, tmp_path, mesh):
    def losses(devices, mesh_shape, name):
        cfg = small_config(tiny_model_dir, small_iopo_file, data__batch_size=4, optimizer__grad_accum=1)
        for a, s in mesh_shape.items():
            cfg.mesh[a] = s
        Trainer(cfg, str(tmp_path / name), devices=devices, progress=False).run()
        return [l["loss"] for l in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if l["split"] == "train"]

    one = losses(jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}, "one")
    eight = losses(jax.devices(), mesh, "eight")
    assert len(one) == 3
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_nan_stops_with_message_and_keeps_checkpoint(tiny_model_dir, small_iopo_file, tmp_path):
    cfg = small_config(tiny_model_dir, small_iopo_file, optimizer__lr=1e30, optimizer__max_grad_norm=0.0,
                       optimizer__warmup_ratio=0.0, train__max_steps=6)
    tr = Trainer(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False)
    with pytest.raises(TrainingDiverged, match=r"non-finite .* last good checkpoint \(step (\d+)\)"):
        tr.run()
    steps = tr.ckpt.latest_step()
    assert steps is not None and steps >= 1
    for v in jax.tree_util.tree_leaves(tr.ckpt.restore(tr._arrays())[0]):
        assert np.all(np.isfinite(np.asarray(v)))


def cli_env():
    """The environment of a user's shell: without the 8 forced host devices conftest sets for sharding tests."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def _cli(workdir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={workdir}", "--noprogress",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cli_env())


def test_cli_rejects_bad_field_and_value(tmp_path):
    r = _cli(tmp_path / "a", "--config.optimizer.lrr=1e-3")
    assert r.returncode != 0 and "lrr" in r.stderr
    r = _cli(tmp_path / "b", "--config.model.path=/nonexistent", "--config.objective.name=dpo_v2")
    assert r.returncode != 0 and "unknown objective 'dpo_v2'" in r.stderr
    r = _cli(tmp_path / "c", "--config.model.path=/x", "--config.model.finetune=half")
    assert r.returncode != 0 and "config.model.finetune='half'" in r.stderr


@pytest.mark.slow
def test_kill9_resume_is_bitwise_exact(tiny_model_dir, small_iopo_file, tmp_path):
    args = [f"--config.model.path={tiny_model_dir}", f"--config.data.train_files={small_iopo_file}",
            "--config.data.val_fraction=0", "--config.data.val_count=4", "--config.data.cutoff_len=256",
            "--config.data.batch_size=2", "--config.data.num_epochs=2", "--config.model.dtype=float32",
            "--config.optimizer.lr=1e-2", "--config.optimizer.grad_accum=1", "--config.train.eval_every=0",
            "--config.train.logprob_chunk=32", "--config.checkpoint.every=2", "--config.train.plot=False",
            "--config.objective.reference=precompute"]
    full = _cli(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    # Interrupted run: kill -9 once a few steps are logged, then rerun the same command.
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={wd}", "--noprogress", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.time() + 600
    while time.time() < deadline:
        m = wd / "metrics.jsonl"
        if m.exists() and sum(1 for l in open(m) if '"train"' in l) >= 5:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = os.listdir(wd / "checkpoints")
    assert ckpts, "no checkpoint was written before the kill"
    again = _cli(wd, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stderr
    a = open(tmp_path / "full" / "export" / "adapter" / "adapter_model.safetensors", "rb").read()
    b = open(wd / "export" / "adapter" / "adapter_model.safetensors", "rb").read()
    assert a == b


@pytest.mark.slow  # > 25 s on 2 cores: runs in .ci/run's second (slow) stage
def test_export_cli_after_training(tiny_model_dir, small_iopo_file, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = small_config(tiny_model_dir, small_iopo_file, train__max_steps=2)
    run = tmp_path / "run"
    tr = Trainer(cfg, str(run), devices=jax.devices()[:1], progress=False)
    tr.run()
    (run / "config.json").write_text(cfg.to_json_best_effort())  # what the train CLI writes
    r = subprocess.run([sys.executable, "-m", "iopo_jax.export", f"--workdir={run}", f"--peft_out={tmp_path / 'ad'}",
                        f"--merged_out={tmp_path / 'merged'}", "--dtype=float32"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = np.array([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 9707, 11, 1879]])
    model = tr.parts.merge(tr.trainable)
    hidden, _ = model(jnp.asarray(ids))
    ours = np.asarray(model.logits(hidden))[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()(torch.tensor(ids)).logits[0].numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
        via_merged = merged.eval()(torch.tensor(ids)).logits[0].numpy()
    assert np.abs(ours - via_peft).max() <= 1e-4
    assert np.abs(ours - via_merged).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.heavy  # ~14 min on 2 cores; CI runs the README's main job (tests/test_before_after.py) instead
def test_cpu_demo_learns(tmp_path):
    """The README's CPU demo command (Training section), as it is: training reward accuracy > 0.9 (v1 and v2),
    validation loss falls."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "iopo_jax.train", "--config=configs/cpu_demo.py",
                        f"--workdir={tmp_path / 'demo'}", "--noprogress"], cwd=REPO, capture_output=True, text=True,
                       timeout=1500, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout, f"\nwall time {time.time() - t0:.0f} s")
    s = json.load(open(tmp_path / "demo" / "summary.json"))
    last = s["train_last"]
    assert last["rewards/accuracies_v1"] > 0.9 and last["rewards/accuracies_v2"] > 0.9, last
    assert s["eval_last"]["loss"] < s["eval_first"]["loss"] - 0.02, (s["eval_first"], s["eval_last"])
    assert "validation loss: start" in r.stdout and os.path.isfile(tmp_path / "demo" / "training_curves.png")


@pytest.mark.slow  # ~1 min on 2 cores
def test_lora_dropout_runs_and_is_deterministic(tiny_model_dir, small_iopo_file, tmp_path):
    """LoRA dropout > 0: dropout masks are reseeded from (seed, step), so reruns are identical."""
    def run(name):
        cfg = small_config(tiny_model_dir, small_iopo_file, model__lora_dropout=0.5, train__max_steps=2,
                           optimizer__grad_accum=1, checkpoint__every=100)
        tr = Trainer(cfg, str(tmp_path / name), devices=jax.devices()[:1], progress=False)
        tr.run()
        return tr, {k: np.asarray(v) for k, v in tr.trainable.items()}

    tr, a = run("a")
    _, b = run("b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_b"))
    # Evaluation is deterministic (dropout off): two evaluations agree exactly.
    assert tr.evaluate()["loss"] == tr.evaluate()["loss"]
