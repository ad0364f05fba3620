"""Export a trained model: the LoRA adapter in PEFT format and/or a merged HF checkpoint.

From a training run (its config.json and latest checkpoint, or --step)::

    python -m iopo_jax.export --workdir=runs/cpu_demo --peft_out=out/adapter --merged_out=out/merged

From a base checkpoint plus a PEFT adapter (e.g. to merge for vLLM)::

    python -m iopo_jax.export --base=/ckpt/Qwen2-7B-Instruct --adapter=out/adapter --merged_out=out/merged
"""
from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags

from data_pipeline import cli
from iopo_jax.checkpoint import Checkpointer
from iopo_jax.models.lora import export_merged, export_peft, load_model_with_adapter
from iopo_jax.models.weights import copy_tokenizer, load_model
from iopo_jax.paths import local_dir_for, workdir_path
from iopo_jax.sharding import make_mesh, use_mesh
from iopo_jax.trainer import abstract_opt_state, lora_config, make_optimizer, split_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (holds config.json and checkpoints/); local or gs://.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_BASE = flags.DEFINE_string("base", None, "Base HF checkpoint directory (with --adapter, instead of --workdir).")
_ADAPTER = flags.DEFINE_string("adapter", None, "PEFT adapter directory to merge into --base.")
_PEFT_OUT = flags.DEFINE_string("peft_out", None, "Write the LoRA adapter here (PEFT format); local or gs://.")
_MERGED_OUT = flags.DEFINE_string("merged_out", None, "Write a HF checkpoint with LoRA merged in here; local or gs://.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "dtype of the merged weights.")


def model_from_run(workdir: str, step: int | None = None):
    """(model with trained weights, config, model_dir) from a training run directory."""
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --workdir must be a training run directory")
    cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor})
    with use_mesh(mesh):
        model, _ = load_model(cfg.model.path, mesh=mesh, param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                              lora=lora_config(cfg))
    parts, trainable = split_model(model, lora=cfg.model.finetune == "lora")
    tx = make_optimizer(cfg.optimizer, 1, trainable)
    # shardings of this process's mesh: a checkpoint saved by another topology (e.g. 2 processes) restores
    # into them (orbax refuses to guess them from the saved metadata)
    opt_state = abstract_opt_state(tx, trainable)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    arrays, meta = ckpt.restore({"params": trainable, "opt_state": opt_state}, step=step)
    if arrays is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    ckpt.close()
    return parts.merge(arrays["params"]), cfg, cfg.model.path, meta["step"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (_PEFT_OUT.value or _MERGED_OUT.value):
        raise app.UsageError("give --peft_out and/or --merged_out")
    if _WORKDIR.value:
        model, cfg, model_dir, step = model_from_run(_WORKDIR.value, _STEP.value)
        tok_dir = cfg.model.tokenizer or model_dir
        print(f"loaded step {step} of {_WORKDIR.value}")
    elif _BASE.value and _ADAPTER.value:
        model, _ = load_model_with_adapter(_BASE.value, _ADAPTER.value)
        model_dir = tok_dir = _BASE.value
    else:
        raise app.UsageError("give --workdir, or --base and --adapter")
    if _PEFT_OUT.value:
        if model.config.lora is None:
            raise app.UsageError("--peft_out: this model was fully fine-tuned (no LoRA adapter); use --merged_out")
        with local_dir_for(_PEFT_OUT.value) as out:
            export_peft(model, out, base_model_name_or_path=os.path.abspath(model_dir)
                        if os.path.isdir(model_dir) else model_dir)
        print(f"wrote PEFT adapter to {_PEFT_OUT.value}")
    if _MERGED_OUT.value:
        with local_dir_for(_MERGED_OUT.value) as out:
            export_merged(model, out, dtype=_DTYPE.value)
            if os.path.isdir(tok_dir):
                copy_tokenizer(tok_dir, out)
        print(f"wrote merged HF checkpoint to {_MERGED_OUT.value}")


if __name__ == "__main__":
    cli.run_app(main)
