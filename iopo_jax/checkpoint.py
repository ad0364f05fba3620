"""Training checkpoints: an orbax ``CheckpointManager`` holding arrays and a JSON side-car.

What is saved: the trainable parameters, the optimizer state and the step (arrays, sharded as they
live on the mesh), and a JSON item with the data iterator position, the RNG seed and anything else
the loop needs to continue exactly. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete), so a crash or ``kill -9`` during a save leaves the previous
checkpoint usable.

Example::

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3)
    ckpt.save(step, {"params": p, "opt_state": o}, {"data": it.get_state()})
    arrays, meta = ckpt.restore(abstract_arrays)      # latest step, or (None, None)
"""
from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from iopo_jax.paths import workdir_path


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        # local: absolute path; gs://...: kept as a URI (orbax writes through epath and tensorstore)
        self.directory = str(workdir_path(directory))
        # cleanup_tmp_directories: a save cut short by kill -9 leaves an uncommitted step (a temporary
        # folder locally; on GCS the step folder without its commit_success.txt); it is deleted here so
        # the resumed run re-saves that step into a clean folder
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(workdir_path(directory), options=options,
                                             item_names=("arrays", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays, meta: dict, force: bool = True) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_arrays, step: int | None = None):
        """Restore ``step`` (default: latest) into arrays shaped and sharded like ``abstract_arrays``.

        ``abstract_arrays`` may hold real arrays or ``jax.ShapeDtypeStruct`` with shardings.
        Returns ``(arrays, meta)`` or ``(None, None)`` when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None, None

        def target(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

        abstract = jax.tree_util.tree_map(target, abstract_arrays)
        out = self.manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
        return out["arrays"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
