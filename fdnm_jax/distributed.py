"""Multi-host start-up: `jax.distributed.initialize` only when asked (a flag or environment variables).

Every host runs the same `python main.py ...`; after `maybe_initialize` the processes see one global
device list and `jax.process_index()` / `jax.process_count()` say which share of each batch a host feeds.

Environment variables (read when the flag does not give the value):
  FDNM_DISTRIBUTED=1            initialise (with JAX's cluster auto-detection unless the fields below are set).
  FDNM_COORDINATOR_ADDRESS      host:port of process 0's coordinator service, e.g. 10.0.0.2:8476.
  FDNM_NUM_PROCESSES            number of processes.
  FDNM_PROCESS_ID               this process's index, 0..num_processes-1.
  FDNM_LOCAL_DEVICE_IDS         optional comma-separated local device ids (one GPU per process).
  FDNM_CPU_COLLECTIVES          optional CPU collectives backend ("gloo") for multi-process CPU runs (tests).
With none of the address fields, `jax.distributed.initialize()` detects TPU pods, SLURM and Open MPI itself.
"""

import dataclasses
import os
from typing import Mapping, Optional

import jax

from fdnm_jax.errors import ConfigError

ENV_PREFIX = "FDNM_"


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """What `jax.distributed.initialize` gets; None fields are left to JAX's cluster auto-detection."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple[int, ...]] = None
  cpu_collectives: Optional[str] = None


def _int_or_none(name: str, value: Optional[str]) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ConfigError(f"{name}={value!r}: expected an integer.") from e


def spec_from_env(env: Optional[Mapping[str, str]] = None, *, enabled: bool = False,
                  coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                  process_id: Optional[int] = None) -> Optional[DistributedSpec]:
  """The initialisation to do, from flag values (first) and FDNM_* environment variables; None = single process.

  Initialisation is asked for by `enabled`, FDNM_DISTRIBUTED=1 or any coordinator/process field.
  Raises:
    ValueError: a partial explicit spec (an address without num_processes and process_id, or the reverse),
      or a process id out of range.
  """
  env = os.environ if env is None else env
  address = coordinator_address or env.get(ENV_PREFIX + "COORDINATOR_ADDRESS") or None
  n = num_processes if num_processes is not None else _int_or_none(
      ENV_PREFIX + "NUM_PROCESSES", env.get(ENV_PREFIX + "NUM_PROCESSES"))
  pid = process_id if process_id is not None else _int_or_none(
      ENV_PREFIX + "PROCESS_ID", env.get(ENV_PREFIX + "PROCESS_ID"))
  asked = enabled or env.get(ENV_PREFIX + "DISTRIBUTED", "").lower() in ("1", "true", "yes")
  if not (asked or address or n is not None or pid is not None):
    return None
  explicit = [address is not None, n is not None, pid is not None]
  if any(explicit) and not all(explicit):
    raise ConfigError(
        "multi-host: give all of the coordinator address, the number of processes and the process id "
        f"(got address={address!r}, num_processes={n}, process_id={pid}; flags --coordinator_address, "
        "--num_processes, --process_id or FDNM_COORDINATOR_ADDRESS, FDNM_NUM_PROCESSES, FDNM_PROCESS_ID), "
        "or none of them to let JAX detect the cluster (TPU pod, SLURM).")
  if n is not None and (n < 1 or not 0 <= pid < n):
    raise ConfigError(f"multi-host: process_id={pid} is not in 0..{n - 1} (num_processes={n}).")
  ids = env.get(ENV_PREFIX + "LOCAL_DEVICE_IDS")
  local_ids = tuple(int(i) for i in ids.split(",")) if ids else None
  return DistributedSpec(address, n, pid, local_ids, env.get(ENV_PREFIX + "CPU_COLLECTIVES") or None)


def is_initialized() -> bool:
  """Whether `jax.distributed.initialize` has run in this process."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client is not None


def maybe_initialize(enabled: bool = False, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None,
                     env: Optional[Mapping[str, str]] = None) -> bool:
  """Calls `jax.distributed.initialize` when a flag or FDNM_* variable asks for it; returns whether it did.

  Must run before anything touches the devices (`jax.devices()`, a jit, a mesh).
  """
  spec = spec_from_env(env, enabled=enabled, coordinator_address=coordinator_address,
                       num_processes=num_processes, process_id=process_id)
  if spec is None or is_initialized():
    return False
  if spec.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", spec.cpu_collectives)
  jax.distributed.initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                             process_id=spec.process_id, local_device_ids=spec.local_device_ids)
  return True
