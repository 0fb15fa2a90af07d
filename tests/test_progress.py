"""Tests for fdnm_jax.progress: the line's numbers and the logging cadence, with a fake clock."""

from fdnm_jax import progress


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_line_counts_rate_and_eta():
  clock, lines = _Clock(), []
  p = progress.Progress("embed", total=100, unit="img", every_s=5.0, log_fn=lines.append, clock=clock)
  clock.t = 2.0
  p.update(20)  # 2 s < 5 s: no line yet.
  assert lines == []
  clock.t = 5.0
  p.update(30)  # 50 images in 5 s = 10 img/s; 50 left -> 5 s.
  assert lines == ["embed: 50/100 (50%), 10.0 img/s, ETA 5s"]
  clock.t = 6.0
  p.update(10)  # 1 s after the last line: silent.
  assert len(lines) == 1
  clock.t = 10.0
  p.update(40)
  p.done()
  p.done()  # idempotent
  assert lines[-1] == "embed: 100/100 (100%), 10.0 img/s, elapsed 10s"
  assert len(lines) == 3


def test_track_counts_items_and_unknown_total():
  clock, lines = _Clock(), []
  p = progress.Progress("trials", unit="trial", every_s=1e9, log_fn=lines.append, clock=clock)

  def items():
    for i in range(3):
      clock.t += 60.0
      yield i

  assert list(p.track(items())) == [0, 1, 2]
  assert p.count == 3
  assert lines == ["trials: 3, 0.0 trial/s, elapsed 3m00s"]


def test_format_seconds():
  assert progress._format_seconds(3725) == "1h02m"
  assert progress._format_seconds(65) == "1m05s"
