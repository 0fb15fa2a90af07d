"""Test-session set-up, before any test starts a JAX backend.

- The CPU XLA flags main.py uses, so tests run the train step as users do (and faster); subprocesses inherit them
  through XLA_FLAGS (those that replace XLA_FLAGS get them again from main.py).
- One persistent JAX compilation cache for the whole session: a fresh folder made by the first pytest process
  (the xdist controller), inherited through JAX_COMPILATION_CACHE_DIR by the workers and by every `main.py` or
  child process a test starts (tests/subprocesses.py keeps the environment), and removed when the session ends.
  Identical programs (the tiny model's train step, its embedding function) then compile once per session instead
  of once per process. A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is and kept.
- XLA's cheap compile mode (JAX_DISABLE_MOST_OPTIMIZATIONS=1) for the whole session, children included: the tests'
  models are tiny, so compilation, not execution, is most of a test's time, and this mode compiles the tiny
  model's train step in about 60 % of the CPU time (docs/benchmarks.md). It changes float rounding (fewer fusions),
  never the maths: every test compares against an independent reference within a float32 bound, or against
  another run of the same session, which uses the same mode. A caller's JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the
  suite with the optimising compiler instead.
"""

import os
import shutil
import tempfile

from fdnm_jax import platform

platform.configure_xla_flags()

_OWN_CACHE_ENV = "FDNM_TEST_SESSION_CACHE"  # set when this session made the cache folder (and removes it).
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdnm_jax_compile_cache_")
  os.environ[_OWN_CACHE_ENV] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Cache every compiled program, also the quick ones (the defaults skip programs compiled in under a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  """The controller (not an xdist worker) removes the cache folder it made."""
  own = os.environ.get(_OWN_CACHE_ENV)
  if own and not hasattr(config, "workerinput") and own == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    shutil.rmtree(own, ignore_errors=True)
