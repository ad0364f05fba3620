"""Train with IOPO, its baselines (SFT, DPO, ORPO, SimPO, IOPO ablations) or online RL (SegPO, GRPO).

    python -m iopo_jax.train --config=configs/cpu_demo.py --workdir=/tmp/iopo_demo
    python -m iopo_jax.train --config=configs/tpu_v4.py --workdir=gs://... --config.optimizer.lr=1e-5

``--config`` is an ml_collections config file (a Python file with ``get_config()``); every field is
documented in configs/base.py and can be overridden as ``--config.section.field=value``. Rerunning
the same command with the same ``--workdir`` resumes from the last checkpoint. On a multi-host TPU
pod run the same command on every host (``jax.distributed.initialize()`` is called automatically when JAX
detects the cluster: TPU pods, SLURM, Open MPI); elsewhere give ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on every process.
"""
from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from data_pipeline import cli
from iopo_jax import paths
from iopo_jax.compile_cache import enable_compilation_cache
from iopo_jax.multihost import detected_cluster, maybe_init_distributed  # noqa: F401  (re-exported)
from iopo_jax.rl.loop import RLTrainer
from iopo_jax.trainer import Trainer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu_demo.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file (Python file with get_config()); fields: configs/base.py.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Output directory: checkpoints, metrics.jsonl, TensorBoard events, plots, exports. "
                               "A local path or a gs://bucket/path URI (needs gcsfs). "
                               "Rerun with the same workdir to resume.")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bar on stderr (--noprogress: none, e.g. in CI logs)")


_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 for a multi-process run (overrides config.coordinator_address; "
                             "also read from JAX_COORDINATOR_ADDRESS). Not needed on TPU pods, SLURM or Open MPI.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (with --coordinator_address).")


def _distributed_args(cfg) -> tuple:
    coord = _COORD.value if _COORD.value is not None else (cfg.get("coordinator_address") or None)
    nproc = _NPROC.value if _NPROC.value is not None else (cfg.get("num_processes") or None)
    pid = _PID.value if _PID.value is not None else cfg.get("process_id", -1)
    return coord, nproc, (None if pid is None or pid < 0 else pid)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("iopo_jax").setLevel(logging.INFO)
    maybe_init_distributed(cfg.get("distributed", "auto"), *_distributed_args(cfg))

    enable_compilation_cache(cfg.train.get("compilation_cache_dir", "auto"))

    trainer_cls = RLTrainer if cfg.objective.name in ("segpo", "grpo") else Trainer
    workdir = str(paths.makedirs(_WORKDIR.value))  # a local folder or a gs://bucket/run URI
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))
    trainer = trainer_cls(cfg, workdir, progress=_PROGRESS.value)
    result = trainer.run()
    if jax.process_index() == 0:
        print(format_result(result))


def format_result(result: dict) -> str:
    if result.get("preempted"):
        return (f"preempted (SIGTERM) after step {result.get('steps')}: checkpoint saved in {result.get('checkpoint')}; "
                "rerun the same command to resume")
    lines = [f"finished {result.get('steps')} steps"]
    tl, tf = result.get("train_last", {}), result.get("train_first", {})
    for k in ("loss", "rewards/accuracies_v1", "rewards/accuracies_v2", "rewards/accuracies", "rewards/margins_v1"):
        if k in tl:
            lines.append(f"  train {k}: first step {tf.get(k, float('nan')):.4f} -> last 10% of steps {tl[k]:.4f}")
    if "rollout_reward_first10" in result:
        lines.append(f"  rollout reward (r_o): first 10 iterations {result['rollout_reward_first10']:.4f} -> "
                     f"last 10 {result['rollout_reward_last10']:.4f}")
    ef, el = result.get("eval_first", {}), result.get("eval_last", {})
    for k in ("loss", "rewards/accuracies_v1", "rewards/accuracies_v2", "rewards/accuracies"):
        if k in el:
            lines.append(f"  validation {k}: start {ef.get(k, float('nan')):.4f} -> end {el[k]:.4f}")
    for name, path in (result.get("exports") or {}).items():
        lines.append(f"  export {name}: {path}")
    if result.get("plot"):
        lines.append(f"  plot: {result['plot']}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_app(main)
