"""fdnm_jax/import_gc.py: the cyclic GC paused in the block, the block's objects frozen after, its state restored."""

import gc

import pytest

from fdnm_jax import import_gc


class _Node:
  pass


def _cycle():
  a, b = _Node(), _Node()
  a.other, b.other = b, a
  return a


def test_the_block_runs_without_the_collector_and_its_objects_are_frozen_after():
  assert gc.isenabled()
  frozen_before = gc.get_freeze_count()
  with import_gc.paused_then_frozen():
    assert not gc.isenabled()
    kept = [_cycle() for _ in range(100)]  # 200 objects that stay alive.
  assert gc.isenabled()
  assert gc.get_freeze_count() >= frozen_before + 200
  # A frozen object is outside every generation: a full collection does not look at it, so it is not tracked there.
  assert not any(o is kept[0] for o in gc.get_objects())
  # Garbage made after the block is collected as usual.
  del kept
  _cycle()
  assert gc.collect() >= 2


def test_a_disabled_collector_stays_disabled_and_an_error_restores_the_state():
  gc.disable()
  try:
    with import_gc.paused_then_frozen():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()
  with pytest.raises(RuntimeError):
    with import_gc.paused_then_frozen():
      raise RuntimeError("an import failed")
  assert gc.isenabled()
