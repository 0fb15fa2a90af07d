"""Ending a finished fdnm-jax process without the interpreter's teardown.

When a Python process exits, CPython (`Py_FinalizeEx`) first waits for the non-daemon threads
(`threading._shutdown`, which also stops `concurrent.futures` pools), then runs the `atexit` handlers (logging's
shutdown, jax.distributed's and JAX's clean-ups, a caller's hooks), flushes sys.stdout and sys.stderr, and only then
tears the interpreter down: it clears every module and frees every object, which runs the destructors of
TensorFlow's, XLA's and Flax's objects. After `main.py`'s imports that teardown alone is 0.6-1.2 s of CPU on a
2-core machine (AVX-512 type; `import tensorflow` alone: ~0.7 s), paid by every `main.py` run and by every
`main.py` the test suite starts (docs/benchmarks.md, issue 17). It writes nothing: fdnm-jax closes what it
writes itself (train.py waits for and closes its checkpoints and flushes its metric writer in a `finally` block;
reports and features are written by `with open(...)` blocks and `np.save` to a path, which close their files).

`exit_without_teardown(code)` does the first three steps exactly as CPython does, flushes the C library's
stdio buffers (output printed by native code), and ends the process with `os._exit(status)`.
"""

import atexit
import ctypes
import os
import sys
import threading
from typing import Union


def exit_without_teardown(code: Union[None, int, object] = None) -> None:
  """Ends the process as `sys.exit(code)` would, minus the interpreter's teardown (module docstring).

  `code` as sys.exit takes it: None is status 0, an int is the status, anything else is printed to stderr and
  gives status 1. Then waits for non-daemon threads, runs every `atexit` handler, flushes Python's and the C
  library's output streams, and calls `os._exit(status)`. Never returns.
  """
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:
    print(code, file=sys.stderr)
    status = 1
  threading._shutdown()  # pylint: disable=protected-access  (what Py_FinalizeEx calls first)
  atexit._run_exitfuncs()  # pylint: disable=protected-access  (then this; each handler runs once)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (AttributeError, OSError, ValueError):  # closed or replaced by a caller: nothing left to flush.
      pass
  try:
    ctypes.CDLL(None).fflush(None)  # native code's buffered stdout (a pipe is block-buffered).
  except (OSError, AttributeError):
    pass
  os._exit(status)  # pylint: disable=protected-access
