"""Orbax checkpoints of the train state: save every N steps, keep the latest k, resume exactly.

The checkpoint folder is `<workdir>/checkpoints/<step>/state` (a local path or gs://). Restoring
goes into an abstract state that carries the current mesh's shardings, so a checkpoint written on
8 devices (or with fsdp-sharded kernels) restores onto 1 device, another mesh or another host
count, and the reverse.
"""

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from fdnm_jax.errors import MissingFileError


def is_remote(path: str) -> bool:
  """Whether `path` is a URL of an object store (gs://bucket/run), not a local path."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; an object-store URL (gs://...) unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  """The folder holding a workdir's checkpoints (`<workdir>/checkpoints`, a local path or a gs:// URL).

  All hosts of a multi-host run write their shards of each checkpoint there, so it must be shared (GCS on a
  TPU pod, a network file system on a GPU cluster); orbax writes the metadata from process 0.
  """
  workdir = absolute(workdir)
  return workdir.rstrip("/") + "/checkpoints" if is_remote(workdir) else os.path.join(workdir, "checkpoints")


def make_manager(workdir: str, ckpt_config: ml_collections.ConfigDict,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` keeping the latest `ckpt_config.keep`."""
  if read_only:  # save and preservation options would only draw orbax warnings on a reader.
    options = ocp.CheckpointManagerOptions(save_interval_steps=0, create=False, read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, ckpt_config.every_steps),
        preservation_policy=ocp.checkpoint_managers.LatestN(n=ckpt_config.keep),
        enable_async_checkpointing=ckpt_config.async_save,
    )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Saves `state` at `step` if the save interval (or `force`) says so; returns whether it did.

  Orbax also saves a step when no checkpoint exists yet; callers that decide the steps themselves pass force=True.
  """
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`: the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
  """Restores the checkpoint at `step` (default: the latest) into `abstract_state`'s shardings.

  Returns:
    (state, step).
  Raises:
    FileNotFoundError: no checkpoint in the manager's folder.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise MissingFileError(f"no checkpoint under {manager.directory}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"], step
