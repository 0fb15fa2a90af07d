"""A tiny progress reporter: a periodic absl log line with count/total, rate and ETA.

Usage:

  progress = Progress("embed gallery", total=len(batches), unit="img")
  for batch in batches:
    ...
    progress.update(len(batch))
  progress.done()

or wrap an iterable: `for x in progress.track(items, "trials"): ...` (counts one per item).

A line is logged at most every `every_s` seconds (wall clock) and once at the end, so a long
loop prints a few lines, never one per item. No tqdm: the lines go through absl logging, which
also works on every host of a pod and in a redirected log file.
"""

import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from absl import logging

T = TypeVar("T")


def _format_seconds(seconds: float) -> str:
  """'42s', '3m05s' or '1h02m' for a duration in seconds."""
  seconds = max(0.0, seconds)
  if seconds < 60:
    return f"{seconds:.0f}s"
  if seconds < 3600:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
  return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
  """Counts work done and logs `name: count/total (pct) rate unit/s, ETA` every `every_s` seconds.

  Attributes:
    name: what is being done, e.g. "embed query (infrared)".
    total: the expected count, or None when unknown (then no percentage or ETA).
    unit: the unit of the count ("img", "trial", "batch").
    every_s: minimum seconds between two log lines; 0 logs on every update.
    count: the count so far.
  """

  def __init__(self, name: str, total: Optional[int] = None, unit: str = "it",
               every_s: float = 10.0, log_fn: Optional[Callable[[str], None]] = None,
               clock: Callable[[], float] = time.monotonic):
    self.name = name
    self.total = total
    self.unit = unit
    self.every_s = every_s
    self.count = 0
    self._log = log_fn if log_fn is not None else logging.info
    self._clock = clock
    self._start = clock()
    self._last_log = self._start
    self._finished = False

  def line(self) -> str:
    """The current progress line (no side effects)."""
    elapsed = self._clock() - self._start
    rate = self.count / elapsed if elapsed > 0 else 0.0
    parts = [f"{self.name}: {self.count}"]
    if self.total:
      parts[0] += f"/{self.total} ({100.0 * self.count / self.total:.0f}%)"
    parts.append(f"{rate:.1f} {self.unit}/s")
    if self.total and rate > 0 and self.count < self.total:
      parts.append(f"ETA {_format_seconds((self.total - self.count) / rate)}")
    else:
      parts.append(f"elapsed {_format_seconds(elapsed)}")
    return ", ".join(parts)

  def update(self, n: int = 1) -> None:
    """Adds `n` to the count and logs a line if `every_s` seconds passed since the last one."""
    self.count += n
    now = self._clock()
    if now - self._last_log >= self.every_s:
      self._last_log = now
      self._log(self.line())

  def done(self) -> None:
    """Logs the final line once (idempotent)."""
    if not self._finished:
      self._finished = True
      self._log(self.line())

  def track(self, items: Iterable[T]) -> Iterator[T]:
    """Yields `items`, counting one per item, and logs the final line at the end."""
    for item in items:
      yield item
      self.update(1)
    self.done()


def track(items: Iterable[T], name: str, total: Optional[int] = None, unit: str = "it",
          every_s: float = 10.0) -> Iterator[T]:
  """Iterates `items` with a Progress line every `every_s` seconds; total defaults to len(items)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  return Progress(name, total=total, unit=unit, every_s=every_s).track(items)
