"""The persistent compilation cache helper: a second process loads the executable instead of compiling."""
import os
import subprocess
import sys

SCRIPT = r"""
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from iopo_jax.compile_cache import enable_compilation_cache
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
print("dir", enable_compilation_cache(sys.argv[1], min_compile_time_secs=0.0))
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
print("value", float(f(jnp.ones((64, 64)))))
print("hits", len(hits))
"""


def _run(path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT, path], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_second_process_hits_the_cache(tmp_path):
    d = str(tmp_path / "xla_cache")
    first = _run(d)
    assert first["dir"] == d and int(first["hits"]) == 0
    assert os.listdir(d), "nothing was written to the cache"
    second = _run(d)
    assert int(second["hits"]) >= 1 and second["value"] == first["value"]


def test_off_leaves_jax_alone():
    from iopo_jax.compile_cache import enable_compilation_cache

    assert enable_compilation_cache("off") is None
    assert enable_compilation_cache("") is None
