"""The heavy imports (TensorFlow, JAX, Flax, Orbax, ...) with Python's cyclic garbage collector paused, and what
they built frozen out of its later passes.

Importing what `main.py` needs makes ~380,000 long-lived objects (modules, functions, classes) and, on the way, six
full collections that walk everything made so far: 0.8 of the 3.3 CPU-s of those imports on a 2-core machine of
the AVX-512 type. Afterwards each full collection still walks them (0.17 s each): tracing the tiny model's train
step triggers several, and tracing took 1.37-1.45 s with them against 0.93-1.04 s with the imported objects frozen
(`gc.freeze()`: moved to a permanent generation the collector skips). docs/benchmarks.md, issue 17, eleventh pass.

The cost: cyclic garbage made by the imports themselves is frozen too, never freed (the imports' own temporaries;
a tiny `main.py` run's peak RSS was 974-979 MB with and without this). Garbage made after the block is collected
as usual.
"""

import contextlib
import gc
from typing import Iterator


def pause() -> bool:
  """Disables the cyclic GC; returns whether it was enabled (for `freeze_and_resume`)."""
  was_enabled = gc.isenabled()
  gc.disable()
  return was_enabled


def freeze_and_resume(was_enabled: bool) -> None:
  """Freezes every object alive (`gc.freeze()`) and enables the cyclic GC again if `was_enabled`."""
  gc.freeze()
  if was_enabled:
    gc.enable()


@contextlib.contextmanager
def paused_then_frozen() -> Iterator[None]:
  """Runs the block with the cyclic GC disabled, then freezes every object alive and restores the collector's
  previous state (enabled or not), also when the block raises."""
  was_enabled = pause()
  try:
    yield
  finally:
    freeze_and_resume(was_enabled)
