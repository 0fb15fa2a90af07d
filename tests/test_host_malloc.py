"""fdnm_jax/host_malloc.py: freed buffers stay in the process (no fresh pages per step), under the user's rules."""

import subprocess
import sys

import pytest

from fdnm_jax import host_malloc
from tests import subprocesses

# A child that mallocs, fills and frees a 40 MiB buffer `rounds` times with glibc's own malloc (as XLA's CPU runtime
# does with a step's temporaries) and prints keep_freed_memory()'s result and the minor page faults of rounds 2-5.
# Transparent huge pages are turned off for the child (prctl PR_SET_THP_DISABLE), so a fresh buffer faults once per
# 4 KiB page on every machine.
_CHILD = """
import ctypes, resource, sys
from fdnm_jax import host_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE.
applied = host_malloc.keep_freed_memory() if sys.argv[1] == "keep" else None
def round_trip():
  p = libc.malloc(40 << 20)
  ctypes.memset(p, 1, 40 << 20)
  libc.free(p)
round_trip()  # round 1: the heap grows (or the buffer is mapped) once.
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (40 << 20) // 4096  # pages a 40 MiB buffer touches.


def _faults(mode, **env):
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=subprocesses.REPO, capture_output=True, text=True,
                       env=dict(subprocesses.env(1), **env), check=True).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(host_malloc._mallopt() is None, reason="not glibc: keep_freed_memory is a no-op (tested below)")  # pylint: disable=protected-access
def test_a_freed_buffer_is_reused_without_new_pages():
  """By default glibc maps a 40 MiB buffer afresh on each allocation (above its largest mmap threshold, 32 MiB), so
  every round faults in all its pages; with keep_freed_memory() rounds 2-5 reuse the freed heap: fewer than a tenth
  of one round's pages fault."""
  applied, kept = _faults("keep", FDNM_KEEP_FREED_MEMORY="1")
  _, plain = _faults("plain")
  assert applied == "True"
  assert plain >= 4 * PAGES * 0.9, plain  # the default: every round faults its pages in.
  assert kept < PAGES / 10, kept


@pytest.mark.parametrize("env", [
    {"FDNM_KEEP_FREED_MEMORY": "0"},
    {"MALLOC_TRIM_THRESHOLD_": "1000000"},
    {"MALLOC_MMAP_THRESHOLD_": "1000000"},
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
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
