"""How tests start fdnm-jax in a fresh process (`main.py`, a child script), as a user runs it.

`env(devices)` keeps what the test session was started with (the user's XLA_FLAGS, e.g.
`--xla_cpu_max_isa=AVX2` to run XLA's own generated code on the other CPU type's instructions, with
`--xla_cpu_experimental_ynn_fusion_type=` beside it to also take the products and reductions away from YNNPACK,
whose kernels follow the CPU's features whatever that flag says; and the session's persistent compilation cache,
see tests/conftest.py) and sets the number of fake CPU devices.
"""

import os
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int, existing: Optional[str] = None) -> str:
  """`existing` XLA flags (default: this process's XLA_FLAGS) with the fake CPU device count set to `devices`."""
  existing = os.environ.get("XLA_FLAGS", "") if existing is None else existing
  kept = [f for f in existing.split() if f.split("=", 1)[0] != _DEVICE_COUNT]
  return " ".join(kept + [f"{_DEVICE_COUNT}={devices}"])


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a child process: this one's, with `devices` fake CPU devices, quiet TensorFlow, unbuffered
  output, and `extra` variables on top."""
  out = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  out["XLA_FLAGS"] = xla_flags(devices)
  out.update(extra)
  return out


def run_main(workdir: str, *args: str, config: Optional[str] = TINY, devices: int = 1, check: bool = True,
             timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
  """Runs `python main.py --config=<config> --workdir=<workdir> <args>` and returns the finished process.

  `config=None` leaves out --config (modes that read the workdir's config.json). With `check`, a non-zero exit
  fails the test with the end of its stderr.
  """
  cmd = [sys.executable, MAIN] + ([f"--config={config}"] if config else []) + [f"--workdir={workdir}", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env(devices, **extra_env), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc
