"""Device mesh, shardings and host-to-global batches: the one place that knows about devices.

Models and losses are written as if for one device; `jax.jit` with the shardings below
turns them into SPMD programs. The mesh has two axes, `data` and `fsdp`; the batch is
split over both. Large parameters (conv and dense kernels of at least `config.mesh.fsdp_min_size`
elements) and their optimizer state are split over `fsdp` by the rule table `PARTITION_RULES`;
small ones (BatchNorm, biases, scalars) are replicated. XLA inserts the all-gathers.
"""

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdnm_jax.errors import ConfigError

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
    raise ConfigError(f"config.mesh: data={data}, fsdp={fsdp}: use positive sizes (data may be -1 = the rest).")
  if data == -1:
    if n % fsdp:
      raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {n} available devices.")
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(
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


def path_str(path: Sequence[Any]) -> str:
  """A pytree key path as "a/b/c" (dict keys, attribute names and sequence indices)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def replicate_rule(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """Rule: the array is held whole on every device."""
  del shape, fsdp, min_size
  return P()


def fsdp_rule(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """Rule: split the largest axis divisible by `fsdp` over the fsdp axis (the last such axis on ties, i.e. the
  output channels of a conv kernel [kh, kw, in, out]); replicated when the array has fewer than `min_size`
  elements, when fsdp is 1, or when no axis divides."""
  size = int(np.prod(shape)) if len(shape) else 1
  if fsdp <= 1 or size < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


Rule = Callable[[Sequence[int], int, int], P]
# Regex on the leaf path ("params/layer1/block0/conv1/kernel", "opt_state/.../trace/layer1/block0/conv1/kernel")
# -> rule; the first match wins, no match = replicated. An optimizer-state leaf (the SGD momentum trace) ends with
# its parameter's path and has its shape, so it gets the same sharding as its parameter.
PARTITION_RULES: tuple[tuple[str, Rule], ...] = (
    (r"(^|/)batch_stats/", replicate_rule),  # BN running statistics: small, read whole by every device.
    (r"(^|/)(bias|scale)$", replicate_rule),  # BN scales/offsets and biases.
    (r"(^|/)(kernel|embedding)$", fsdp_rule),  # conv [kh, kw, in, out] and dense [in, out] kernels.
)


def partition_spec(path: str, shape: Sequence[int], fsdp: int, min_size: int,
                   rules: Sequence[tuple[str, Rule]] = PARTITION_RULES) -> P:
  """The PartitionSpec of one state leaf from the first rule whose regex matches `path`; P() when none does."""
  for pattern, rule in rules:
    if re.search(pattern, path):
      return rule(tuple(shape), fsdp, min_size)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int = 1 << 16) -> Any:
  """Shardings for a train-state pytree (of arrays or ShapeDtypeStructs), by `PARTITION_RULES`.

  Args:
    abstract_state: the state (any pytree whose leaves have `.shape`).
    mesh: the (data, fsdp) mesh.
    fsdp_min_size: kernels with at least this many elements are split over fsdp (`config.mesh.fsdp_min_size`).
  Returns:
    A pytree of NamedShardings with the structure of `abstract_state`.
  """
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, partition_spec(path_str(path), x.shape, fsdp, fsdp_min_size)),
      abstract_state)


def describe_shardings(abstract_state: Any, shardings: Any, top: int = 5) -> str:
  """Text lines "path shape spec" for the `top` largest leaves of a state (for the log)."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  rows = sorted(zip(leaves, specs), key=lambda r: -int(np.prod(r[0][1].shape)))[:top]
  return "\n".join(f"  {path_str(p)} {tuple(x.shape)} {s.spec}" for (p, x), s in rows)


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
