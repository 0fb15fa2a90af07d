"""Device mesh, shardings and host-to-global batches: the one place that knows about devices.

Models and losses are written as if for one device; `jax.jit` with the shardings below
turns them into SPMD programs. The mesh has two axes, `data` and `fsdp`; the batch is
split over both. Parameters and optimizer state are replicated here (parameter sharding
over `fsdp` is configured by `state_shardings`).
"""

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
  """Builds the (data, fsdp) mesh from `config.mesh`; -1 on `data` takes the remaining devices.

  Both axes are `AxisType.Auto` so XLA propagates shardings (Explicit axes reject the
  batch-hard triplet's distance matrix on a batch-sharded array).
  """
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  fsdp = mesh_config.fsdp
  data = mesh_config.data
  if fsdp < 1 or (data != -1 and data < 1):
    raise ValueError(f"config.mesh: data={data}, fsdp={fsdp}: use positive sizes (data may be -1 = the rest).")
  if data == -1:
    if n % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} available devices.")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
        f"config.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available; "
        "set config.mesh.data=-1 to use the rest.")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(auto, auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays whose leading axis is the batch: split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device."""
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  """Number of pieces the batch axis is split into."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a train-state pytree (of arrays or ShapeDtypeStructs): replicated."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this host's slice of a batch into global arrays sharded over the batch axes.

  Args:
    batch: name -> array whose leading axis is this process's share of the global batch.
    mesh: the device mesh.
  Returns:
    name -> global `jax.Array` of leading size (local size x process count).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
