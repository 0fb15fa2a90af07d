"""fdnm_jax/host_malloc.py: freed buffers stay in the process (no fresh pages per step), under the user's rules."""

import resource
import subprocess
import sys

import pytest

from fdnm_jax import host_malloc
from tests import subprocesses

# A child that mallocs, fills and frees two 40 MiB buffers 5 times with glibc's own malloc (as XLA's CPU runtime does
# with a step's temporaries), in its main thread or in a worker thread, and prints keep_freed_memory()'s result and
# the minor page faults of rounds 2-5.
# Transparent huge pages are turned off for the child (prctl PR_SET_THP_DISABLE), so a fresh buffer faults once per
# 4 KiB page on every machine.
_CHILD = """
import ctypes, resource, sys, threading
from fdnm_jax import host_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE.
applied = host_malloc.keep_freed_memory() if sys.argv[1] == "keep" else None
def round_trip():  # two buffers: in a worker thread the second one does not fit its arena's first heap.
  buffers = [libc.malloc(40 << 20) for _ in range(2)]
  for p in buffers:
    ctypes.memset(p, 1, 40 << 20)
  for p in reversed(buffers):
    libc.free(p)
def rounds(out):
  round_trip()  # round 1: the heap grows (or the buffer is mapped) once.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(4):
    round_trip()
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
if sys.argv[2] == "thread":  # a worker thread mallocs from its own arena (64 MiB heaps), as XLA's threads do.
  worker = threading.Thread(target=rounds, args=(out,))
  worker.start()
  worker.join()
else:
  rounds(out)
print(applied, out[0])
"""
PAGES = 2 * (40 << 20) // resource.getpagesize()  # pages a round's two 40 MiB buffers touch.


def _glibc_defaults_env(**extra):
  """The child's environment without the caller's malloc settings (MALLOC_*_ variables, GLIBC_TUNABLES): a suite run
  under the user's own settings would otherwise measure them, and keep_freed_memory() rightly leaves them alone."""
  env = {k: v for k, v in subprocesses.env(1).items()
         if k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))}
  return dict(env, **extra)


def _faults(mode, thread, **env):
  out = subprocess.run([sys.executable, "-c", _CHILD, mode, thread], cwd=subprocesses.REPO, capture_output=True,
                       text=True, env=_glibc_defaults_env(**env), check=True).stdout.split()
  return out[0], int(out[1])


_NOT_GLIBC = host_malloc._mallopt() is None  # pylint: disable=protected-access


@pytest.mark.skipif(_NOT_GLIBC, reason="not glibc: keep_freed_memory is a no-op there (tested below)")
@pytest.mark.parametrize("thread", ["main", "thread"])
def test_a_freed_buffer_is_reused_without_new_pages(thread):
  """By default glibc maps each 40 MiB buffer afresh (above its largest mmap threshold, 32 MiB): every round faults
  in all its pages. With keep_freed_memory() rounds 2-5 reuse the freed memory: fewer than a tenth of one round's
  pages fault, in the main thread (the raised mmap and trim thresholds) and in a worker thread, whose arena would
  otherwise delete the extra heap the freed second buffer emptied (the top pad; without it, 40,964 faults)."""
  applied, kept = _faults("keep", thread, FDNM_KEEP_FREED_MEMORY="1")
  _, plain = _faults("plain", thread)
  assert applied == "True"
  # glibc's default maps each buffer afresh, and without huge pages each of its pages faults once a round: at least
  # 4 * PAGES in rounds 2-5 (81,928 on glibc 2.36: the buffers' pages and a few of glibc's). Kept memory faults only
  # in glibc's bookkeeping (0 measured): a tenth of one round's pages is far above that and far below a round.
  assert plain >= 4 * PAGES, plain
  assert kept < PAGES / 10, kept


@pytest.mark.parametrize("env", [
    {"FDNM_KEEP_FREED_MEMORY": "0"},
    {"MALLOC_TRIM_THRESHOLD_": "1000000"},
    {"MALLOC_MMAP_THRESHOLD_": "1000000"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
    {"MALLOC_TOP_PAD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"},
])
def test_the_users_own_settings_or_the_opt_out_change_nothing(env, monkeypatch):
  calls = []
  monkeypatch.setattr(host_malloc, "_mallopt", lambda: calls.append(1))
  assert host_malloc.keep_freed_memory(env) is False
  assert not calls  # mallopt was not even looked up.


def test_other_tunables_or_no_glibc(monkeypatch):
  assert not host_malloc.user_sets_thresholds({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  monkeypatch.setattr(host_malloc, "_mallopt", lambda: None)  # macOS, musl: nothing to call.
  assert host_malloc.keep_freed_memory({}) is False


def test_a_refused_mmap_threshold_sets_nothing_else(monkeypatch):
  """A glibc that caps the mmap threshold refuses 1 GiB: the trim threshold is then left alone too (setting it alone
  would stop glibc's own adjustment of the mmap threshold)."""
  calls = []

  def mallopt(param, value):
    calls.append((param, value))
    return 0 if param == host_malloc.M_MMAP_THRESHOLD else 1

  monkeypatch.setattr(host_malloc, "_mallopt", lambda: mallopt)
  assert host_malloc.keep_freed_memory({}) is False
  assert calls == [(host_malloc.M_MMAP_THRESHOLD, host_malloc.MMAP_THRESHOLD_BYTES)]
