"""Test-session set-up, before any test starts a JAX backend.

- The CPU XLA flags main.py uses, so tests run the train step as users do (and faster); subprocesses inherit them
  through XLA_FLAGS (those that replace XLA_FLAGS get them again from main.py).
- One persistent JAX compilation cache for the whole session: a fresh folder made by the first pytest process
  (the xdist controller), inherited through JAX_COMPILATION_CACHE_DIR by the workers and by every `main.py` or
  child process a test starts (tests/subprocesses.py keeps the environment), and removed when the session ends.
  Identical programs (the tiny model's train step, its embedding function) then compile once per session instead
  of once per process. A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is and kept.
- TensorFlow imported as main.py imports it, without its eager Keras import (fdnm_jax/tensorflow_import.py), and,
  as main.py does, a test process's imports (TensorFlow, JAX, the test modules) made with the cyclic GC paused and
  their objects frozen once collection ends (fdnm_jax/import_gc.py).
- One session folder (FDNM_TEST_SESSION_DIR, made and removed like the cache folder) for the runs that
  tests/shared_runs.py trains once per session; the `tiny_run` fixture is the finished tiny run.
- Under `--dist loadgroup` (.ci/run, the README) every module marked `xdist_group` must really be grouped (its
  module fixtures, trained runs, built once on one worker): the pytest / pytest-xdist pair whose grouping silently
  does nothing (pytest 9 with xdist <= 3.8.0) stops the session with the fix instead of doubling those fixtures.
- XLA's cheap compile mode (JAX_DISABLE_MOST_OPTIMIZATIONS=1) for the whole session, children included: the tests'
  models are tiny, so compilation, not execution, is most of a test's time, and this mode compiles the tiny
  model's train step in about 60 % of the CPU time (docs/benchmarks.md). It changes float rounding (fewer fusions),
  never the maths: every test compares against an independent reference within a float32 bound, or against
  another run of the same session, which uses the same mode. A caller's JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the
  suite with the optimising compiler instead. In this mode XLA's older loop emitters for fused elementwise code
  (`CHEAP_COMPILE_XLA_FLAGS`, added to XLA_FLAGS unless the caller's XLA_FLAGS names the flag) compile the tiny
  model's train step in under half the time again, the same step-1 losses to float32 noise.
- Bytecode written as the session imports: the test command installs without bytecode (`python tools/install.py
  requirements-dev.txt`: uv, or pip with `--no-compile`; pip's byte-compilation of the whole stack, ~16,500 files,
  is ~48 s of one core; the suite imports ~5,300 of them), so
  the session's processes write the bytecode of what they import, once, and the ~50 processes after them read it.
  A PYTHONDONTWRITEBYTECODE=1 in the environment (the machines here set it) would make every process compile those
  sources again (~11 CPU-s each), so the session lifts it for itself, its workers and their children (the files go
  to `__pycache__` folders, which .gitignore lists). A venv installed with bytecode is read as it is.
- The test files that hold a test marked `slow` (seconds to a minute each) are collected first: under xdist the
  long tests start early and the last work units handed out are short, so no worker idles for a minute at the end
  while the other finishes a long test (`pytest_collection_modifyitems`).
"""

import os
import shutil
import sys
import tempfile

import pytest
from fdnm_jax import import_gc, platform
from tests import shared_runs

_GC_WAS_ENABLED = pytest.StashKey[bool]()

platform.configure_xla_flags()

# Before any worker or child starts: they inherit the environment, and this process writes from here on.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

_OWN_CACHE_ENV = "FDNM_TEST_SESSION_CACHE"  # set when this session made the cache folder (and removes it).
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdnm_jax_compile_cache_")
  os.environ[_OWN_CACHE_ENV] = os.environ["JAX_COMPILATION_CACHE_DIR"]
# The session's own folder (tests/shared_runs.py: runs trained once per session), made like the cache folder.
_OWN_SESSION_DIR_ENV = "FDNM_TEST_OWN_SESSION_DIR"
if not os.environ.get(shared_runs.SESSION_DIR_ENV):
  os.environ[shared_runs.SESSION_DIR_ENV] = os.environ[_OWN_SESSION_DIR_ENV] = tempfile.mkdtemp(prefix="fdnm_tests_")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# With the cheap compile mode, XLA's older loop emitters for fused elementwise code: the tiny model's train step
# compiles in ~43 % of the CPU time and its init in ~67 %, with the same losses to float32 noise (docs/benchmarks.md).
# Not with the optimising compiler, where they made init's compile twice as slow (so main.py does not add it).
CHEAP_COMPILE_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1" and platform.runs_on_cpu():
  os.environ["XLA_FLAGS"] = platform.merge_flags(os.environ.get("XLA_FLAGS", ""), CHEAP_COMPILE_XLA_FLAGS)[0]
# Cache every compiled program, also the quick ones (the defaults skip programs compiled in under a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _check_loadgroup(config) -> None:
  """--dist loadgroup with a pytest whose node ids pytest-xdist <= 3.8.0 cannot rename (pytest >= 9 keeps them in
  Node._id; xdist renames Node._nodeid) groups nothing: the modules marked xdist_group then build their module
  fixtures (trained runs) once per worker. Stop before the session starts, naming the fix."""
  if getattr(config.option, "dist", "no") != "loadgroup":
    return
  import xdist  # pylint: disable=g-import-not-at-top
  def version(v):
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())
  if version(pytest.__version__) >= (9,) and version(xdist.__version__) <= (3, 8, 0):
    raise pytest.UsageError(f"--dist loadgroup does not group tests with pytest {pytest.__version__} and "
                            f"pytest-xdist {xdist.__version__}: install the pinned versions (pip install -r "
                            "requirements-dev.txt: pytest 8.4.2) or run without --dist loadgroup")


def pytest_configure(config):
  """The xdist controller checks --dist loadgroup works (`_check_loadgroup`). Test processes (an xdist worker, or
  the only process without -n) import TensorFlow as main.py does (fdnm_jax/tensorflow_import.py: without its eager
  Keras import); the xdist controller imports none of it."""
  if not hasattr(config, "workerinput"):
    try:
      _check_loadgroup(config)
    except pytest.UsageError:
      _remove_own_folders()  # the session ends here, before pytest_unconfigure would run.
      raise
  if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
    # The imports from here to the end of collection (TensorFlow, JAX, the test modules) without the cyclic GC's
    # passes, their objects frozen after (fdnm_jax/import_gc.py, as main.py does): `pytest_collection_finish`.
    config.stash[_GC_WAS_ENABLED] = import_gc.pause()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as main.py.
    from fdnm_jax import tensorflow_import  # pylint: disable=g-import-not-at-top
    # TensorFlow's C++ start-up lines (oneDNN, absl) go to fd 2 whatever TF_CPP_MIN_LOG_LEVEL says, and here, before
    # pytest captures output, they would print once per worker; an import error still raises (and prints) after.
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
      tensorflow_import.load()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)


def pytest_collection_finish(session):
  """A test process's imports are done (`pytest_configure` paused the cyclic GC): freeze their objects, resume."""
  if _GC_WAS_ENABLED in session.config.stash:
    import_gc.freeze_and_resume(session.config.stash[_GC_WAS_ENABLED])


def pytest_collection_modifyitems(config, items):
  """The files with a `slow` test first, each file's tests kept together and in order (module fixtures are built
  once) and the files otherwise in collection order: a stable sort, the same on every xdist worker. pytest-xdist's
  loadgroup scheduler then hands out the multi-test groups (largest first), the tests of the slow files, and last
  the files of quick tests, which fill the gaps."""
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)


def _remove_own_folders() -> None:
  own = os.environ.get(_OWN_CACHE_ENV)
  if own and own == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    shutil.rmtree(own, ignore_errors=True)
  own = os.environ.get(_OWN_SESSION_DIR_ENV)
  if own and own == os.environ.get(shared_runs.SESSION_DIR_ENV):
    shutil.rmtree(own, ignore_errors=True)


def pytest_unconfigure(config):
  """The controller (not an xdist worker) removes the cache and session folders it made."""
  if not hasattr(config, "workerinput"):
    _remove_own_folders()


@pytest.fixture
def tiny_run() -> tuple[str, dict]:
  """(workdir, the report train_and_evaluate returned) of a finished run of tests/configs/tiny.py (4 steps,
  checkpoints 2 and 4, results/tiny.json), trained once per test session (tests/shared_runs.py) and checked
  unchanged before each test: read it, or copy it to change it."""
  return shared_runs.tiny()
