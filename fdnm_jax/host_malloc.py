"""Keeps the memory a train step frees inside the process instead of handing it back to the kernel (glibc malloc).

XLA's CPU runtime mallocs each execution's buffers (the step's temporaries, its outputs; Eigen's and the FFT's work
buffers) and frees them when the step ends. glibc serves an allocation above its mmap threshold (adjusted on the fly,
at most 32 MiB) with a fresh `mmap` and unmaps it on `free`; it gives freed heap above its trim threshold back to the
kernel; and a worker thread's own arena (64 MiB heaps) deletes a heap that falls entirely free. Either way the next
step writes to fresh pages, and every first touch of one is a page fault the kernel serves with a zeroed page: the
README demo (configs/synthetic.py, 64 images of 64 x 32 a step) took ~10,500 faults, ~25 ms of system time, per step
of ~80 ms (2-core AVX-512 VM; docs/benchmarks.md, issue 17 thirteenth pass). `keep_freed_memory()` sets, with
`mallopt`, the mmap threshold to 1 GiB, the trim threshold to 2 GiB and the top pad to 128 MiB (a pad above a thread
heap's size keeps the emptied heap), so those buffers come from the heap and are reused.

The cost: the process keeps its peak heap until it exits (its resident size no longer shrinks after a large step),
which a training or evaluation process reaches again at its next step anyway; the pad is address space, touched only
when used. Allocations of 1 GiB and more (a large model's temporaries on the CPU) are still mmapped as before.

Rules: glibc only (on macOS or musl it changes nothing); nothing is changed when the environment already sets one of
these (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, or GLIBC_TUNABLES naming
glibc.malloc.mmap_threshold, trim_threshold or top_pad), or when FDNM_KEEP_FREED_MEMORY=0. Call it first thing in a
process (main.py does), before the allocations it should govern.
"""

import ctypes
import logging
import os
from collections.abc import Mapping

# glibc <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30  # allocations below it come from the heap.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # free heap kept up to this (mallopt takes an int).
TOP_PAD_BYTES = 128 << 20  # above a thread arena's 64 MiB heap: an emptied heap is kept.
DISABLE_ENV = "FDNM_KEEP_FREED_MEMORY"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad")


def user_sets_thresholds(environ: Mapping[str, str] = os.environ) -> bool:
  """True when `environ` sets glibc's mmap threshold, trim threshold or top pad itself (an environment variable or
  GLIBC_TUNABLES)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  return any(name in environ for name in _USER_SETTINGS) or any(name in tunables for name in _USER_TUNABLES)


def _mallopt():
  """glibc's `mallopt`, or None where the C library has none (not glibc)."""
  try:
    return ctypes.CDLL(None).mallopt
  except (AttributeError, OSError):
    return None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
  """Raises glibc's mmap and trim thresholds and its top pad (module docstring); returns True when all were set.

  A no-op returning False without glibc, when `environ` sets a threshold itself, or when FDNM_KEEP_FREED_MEMORY=0.
  """
  if environ.get(DISABLE_ENV, "1") == "0" or user_sets_thresholds(environ):
    return False
  mallopt = _mallopt()
  if mallopt is None:
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # Any threshold set by mallopt also stops glibc's own adjustment of the mmap threshold: where the mmap threshold
  # is refused (a glibc that caps it at 32 MiB), setting the trim threshold alone would leave the mmap threshold at
  # its 128 KiB start (more mmaps than before: measured), so nothing more is set.
  if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
    logging.debug("host_malloc: glibc refused an mmap threshold of %d bytes; malloc keeps its defaults",
                  MMAP_THRESHOLD_BYTES)
    return False
  trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
  return mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1 and trim
