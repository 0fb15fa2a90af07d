"""XLA flags for the CPU backend (added to XLA_FLAGS before JAX starts a backend); the init program's options.

On the x86 CPU backend of jaxlib 0.10.2 convolutions are by default handed to the YNNPACK library, which is 2-3x
slower than XLA's own Eigen convolutions for ResNet-50 training on a 2-core AVX-512 machine (docs/benchmarks.md);
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` takes convolutions (only) away from it. Turning
YNNPACK off entirely made BatchNorm slow instead, so only that fusion type is removed.

  from fdnm_jax import platform
  platform.configure_xla_flags()   # before the first JAX computation (jax may already be imported)

Rules: nothing is added when JAX_PLATFORMS names a first platform other than "cpu", or, with JAX_PLATFORMS unset,
when an accelerator plugin (CUDA, ROCm, TPU) is installed; a flag whose name already appears in the user's
XLA_FLAGS is never added or overridden; after a backend has started the flags could no longer take effect, so
nothing is changed and a warning is logged.

`init_compiler_options(platform)` gives the options the one-off init program compiles with (XLA's backend level 2 on
the CPU: the same parameters in 35-60 % of the compile time; see `INIT_COMPILER_OPTIONS`).
"""

import importlib.util
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import Optional

# Flags added on the CPU (name=value); each was measured on the train step (docs/benchmarks.md).
CPU_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)

_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].strip()


def _flag_names(xla_flags: str) -> set[str]:
  """The names of the flags in an XLA_FLAGS string."""
  return {_flag_name(f) for f in xla_flags.split()}


def _accelerator_installed() -> bool:
  return any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)


def _backend_started() -> bool:
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def runs_on_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
  """True when JAX will pick the CPU: JAX_PLATFORMS starts with "cpu", or is unset and no accelerator plugin is
  installed."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_installed()


def merge_flags(existing: str, flags: Sequence[str]) -> tuple[str, list[str]]:
  """Appends each flag of `flags` whose name is not already in `existing` (an XLA_FLAGS string).

  Returns:
    (the new XLA_FLAGS string, the flags that were added).
  """
  present = _flag_names(existing)
  added = [f for f in flags if _flag_name(f) not in present]
  return " ".join(existing.split() + added), added


def configure_xla_flags(environ: MutableMapping[str, str] = os.environ,
                        flags: Sequence[str] = CPU_XLA_FLAGS) -> list[str]:
  """Adds `flags` to environ["XLA_FLAGS"] when JAX runs on the CPU (see the module docstring for the rules).

  Call it before the first JAX computation. Returns the flags added (empty when nothing was changed).
  """
  if not runs_on_cpu(environ):
    return []
  new, added = merge_flags(environ.get("XLA_FLAGS", ""), flags)
  if not added:
    return []
  if _backend_started():
    logging.warning("configure_xla_flags: a JAX backend has already started; %s not applied (call it before the "
                    "first JAX computation).", " ".join(added))
    return []
  environ["XLA_FLAGS"] = new
  return added


# The one-off init program (train.build_run) compiled at XLA's backend optimisation level 2 instead of its default 3:
# on a 2-core AVX-512 VM the README demo's init compiled in 2.4 s instead of 6.9 s and the full FDNM (ResNet-50)'s in
# 4.9 s instead of 8.3 s, running 0.27 s instead of 0.24 s, with every parameter bitwise the same (with
# XLA_FLAGS=--xla_cpu_max_isa=AVX2 as well; docs/benchmarks.md, issue 17 thirteenth pass). The train step keeps the
# default: level 2 changes its rounding and did not make it faster.
INIT_COMPILER_OPTIONS: dict[str, int] = {"xla_backend_optimization_level": 2}


def init_compiler_options(platform: str, environ: MutableMapping[str, str] = os.environ,
                          cheap_mode: Optional[bool] = None) -> Optional[dict[str, int]]:
  """Compiler options for the jitted init on `platform` (a JAX device's `.platform`): `INIT_COMPILER_OPTIONS` on the
  CPU; None (the defaults) on an accelerator, in JAX's cheap compile mode (`cheap_mode`, default: JAX's
  jax_disable_most_optimizations, JAX_DISABLE_MOST_OPTIMIZATIONS=1, which compiles at level 0 already), or when the
  user's XLA_FLAGS set the level."""
  if cheap_mode is None:
    import jax  # pylint: disable=g-import-not-at-top  (this module is imported before JAX starts a backend)
    cheap_mode = bool(jax.config.read("jax_disable_most_optimizations"))
  user_flags = _flag_names(environ.get("XLA_FLAGS", ""))
  if platform != "cpu" or cheap_mode or "--xla_backend_optimization_level" in user_flags:
    return None
  return dict(INIT_COMPILER_OPTIONS)
