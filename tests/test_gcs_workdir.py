"""gs:// workdirs against a local GCS emulator (gcp-storage-emulator on 127.0.0.1, a free port).

Clients pointed at it: gcsfs and google-cloud-storage through ``STORAGE_EMULATOR_HOST`` (etils.epath uses
gcsfs for gs:// when TensorFlow is absent), tensorstore (orbax's array writer) through
``TENSORSTORE_GCS_HTTP_URL`` with a fixed test token. Nothing reaches the network.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from conftest import REPO  # noqa: E402
from procs import tiny_train_args  # noqa: E402

BUCKET = "iopo-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(port: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "GOOGLE_CLOUD_PROJECT": "test"}


def _send_generation_headers():
    """Real GCS answers a media download with ``x-goog-generation`` (the object's generation), which
    tensorstore's OCDBT reads to update its manifest; the stub emulator leaves it out (tensorstore then
    fails with "Malformed StorageGeneration" at the second write of a manifest). Add it."""
    from gcp_storage_emulator import server as srv
    from gcp_storage_emulator.handlers import objects

    orig = objects.download
    if getattr(orig, "_adds_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # a missing object: the original handler answers 404
            pass
        return orig(request, response, storage, *args, **kwargs)

    download._adds_generation = True
    objects.download = download  # objects.get(alt=media) calls it by name
    for _, handlers in srv.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is orig:
                handlers[method] = download


@pytest.fixture(scope="module")
def gcs():
    """A running in-memory emulator with one bucket; sets the clients' environment for this process too."""
    import logging

    from gcp_storage_emulator.server import create_server

    _send_generation_headers()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s of existence checks

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = emulator_env(port)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached instance may point at another endpoint
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


def _objects(prefix: str) -> list[str]:
    """Object names under gs://BUCKET/prefix, listed by a separate client (google-cloud-storage)."""
    from google.cloud import storage

    client = storage.Client(project="test")
    return sorted(b.name for b in client.list_blobs(BUCKET, prefix=prefix))


def test_paths_and_checkpoints_write_to_the_emulator(gcs, tmp_path):
    import jax
    import jax.numpy as jnp

    from iopo_jax import paths
    from iopo_jax.checkpoint import Checkpointer

    root = f"gs://{BUCKET}/unit"
    paths.write_text(root + "/a/summary.json", '{"x": 1}')
    paths.save_npz(root + "/ref.npz", index=np.arange(3), logps=np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(paths.load_npz(root + "/ref.npz")["index"], np.arange(3))
    log = paths.AppendFile(root + "/metrics.jsonl")
    log.write('{"step": 1}\n')
    log.flush()
    log.close()
    log = paths.AppendFile(root + "/metrics.jsonl")  # a resumed run appends after the old lines
    log.write('{"step": 2}\n')
    log.close()
    with paths.local_dir_for(root + "/export/adapter") as d:
        assert not paths.is_remote(d) and os.path.isdir(d)
        open(os.path.join(d, "w.bin"), "wb").write(b"abc")
    tb = paths.summary_writer(root + "/tb")
    tb.add_scalar("train/loss", 1.5, 1)
    tb.flush()
    tb.close()
    ck = Checkpointer(root + "/checkpoints", async_save=False)
    ck.save(3, {"w": jnp.arange(4.0)}, {"step": 3})
    ck.close()

    names = _objects("unit/")
    assert "unit/a/summary.json" in names and "unit/ref.npz" in names and "unit/export/adapter/w.bin" in names
    assert any(n.startswith("unit/tb/events.out.tfevents") for n in names), names
    assert any(n.startswith("unit/checkpoints/3/arrays/") for n in names), names
    from google.cloud import storage

    bucket = storage.Client(project="test").bucket(BUCKET)
    assert bucket.blob("unit/metrics.jsonl").download_as_bytes() == b'{"step": 1}\n{"step": 2}\n'
    ev = next(n for n in names if n.startswith("unit/tb/events"))
    assert b"train/loss" in bucket.blob(ev).download_as_bytes()

    ck = Checkpointer(root + "/checkpoints")
    arrays, meta = ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    ck.close()
    np.testing.assert_array_equal(np.asarray(arrays["w"]), np.arange(4.0))
    assert meta == {"step": 3} and ck.directory == root + "/checkpoints"
    assert not (REPO / "gs:").exists() and not (tmp_path / "gs:").exists()  # never a local folder named gs:


def _args(model_dir, data_file):
    return tiny_train_args(model_dir, data_file, train__eval_every=4, checkpoint__every=2, train__plot=True,
                           objective__reference="precompute")


def _env(extra: dict) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a user's shell: one CPU device
    env.update(extra, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _train(workdir, args, env, timeout=600):
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={workdir}", "--noprogress",
           *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_gs_workdir_train_kill_resume_export(gcs, tiny_model_dir, tmp_path):
    """The real CLI with --workdir=gs://...: train, kill -9 after a checkpoint, rerun (resumes from the
    bucket), export into the bucket; the adapter equals an uninterrupted local run's bit for bit, and
    ``python -m iopo_jax.export --workdir=gs://...`` reads the run back from the bucket."""
    from etils import epath

    groups = json.load(open(REPO / "data_pipeline" / "demo_data" / "iopo_train.json"))[:12]
    data_file = tmp_path / "iopo12.json"  # 8 training groups: 4 steps of 2
    data_file.write_text(json.dumps(groups, ensure_ascii=False))
    args = _args(tiny_model_dir, str(data_file))
    env = _env(gcs)
    t0 = time.time()
    local = _train(tmp_path / "local", args, env)
    assert local.returncode == 0, local.stderr[-3000:]
    t_local = time.time() - t0

    run = f"gs://{BUCKET}/runs/iopo"
    cmd = [sys.executable, "-m", "iopo_jax.train", "--config=configs/base.py", f"--workdir={run}", "--noprogress",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            # orbax on GCS marks a finished step with <step>/commit_success.txt (written last)
            if "runs/iopo/checkpoints/2/commit_success.txt" in _objects("runs/iopo/checkpoints/2/"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    names = _objects("runs/iopo/")
    assert "runs/iopo/config.json" in names
    assert any(n.startswith("runs/iopo/data_cache/") and n.endswith("meta.json") for n in names), names
    assert any(n.startswith("runs/iopo/ref_logps_train_") for n in names), names
    assert not any(n.startswith("runs/iopo/export/") for n in names)

    t0 = time.time()
    again = _train(run, args, env)
    t_gcs = time.time() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stderr, again.stderr[-3000:]
    names = _objects("runs/iopo/")
    for want in ("runs/iopo/summary.json", "runs/iopo/metrics.jsonl", "runs/iopo/training_curves.png",
                 "runs/iopo/export/adapter/adapter_model.safetensors", "runs/iopo/export/adapter/adapter_config.json"):
        assert want in names, (want, names)
    assert any(n.startswith("runs/iopo/tb/events.out.tfevents") for n in names), names
    assert any(n.startswith("runs/iopo/checkpoints/4/") for n in names), names
    rd = epath.Path(run)
    steps = [json.loads(line)["step"] for line in (rd / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps[0] == 1 and steps[-1] == 4, steps  # the resumed run appended to the killed run's lines
    assert json.loads((rd / "summary.json").read_text())["steps"] == 4
    a = (tmp_path / "local" / "export" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (rd / "export" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b  # resumed from the bucket, ends on the uninterrupted run's weights

    # read the run back from the bucket: the export CLI restores the checkpoint from gs:// and writes there
    out = subprocess.run([sys.executable, "-m", "iopo_jax.export", f"--workdir={run}",
                          f"--peft_out={run}/export_again"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    c = (rd / "export_again" / "adapter_model.safetensors").read_bytes()
    from safetensors.numpy import load as st_load

    ta, tc = st_load(a), st_load(c)
    assert ta.keys() == tc.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tc[k], err_msg=k)
    assert not (REPO / "gs:").exists()
    print(f"tiny IOPO, 4 steps: local workdir {t_local:.0f} s; gs:// resume of the killed run {t_gcs:.0f} s")
