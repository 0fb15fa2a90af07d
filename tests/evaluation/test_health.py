"""Embedding health numbers (fdnm_jax/evaluation/health.py) against hand-worked cases and NumPy definitions."""

import numpy as np
import pytest

from fdnm_jax.evaluation import health
from tests.rounding import EPS64, U

# mean_cosine_to_mean in float64 of N rows of D values: row norms and divisions ((D / 2 + 2) u64 each), the mean of
# the N unit rows (N u64), its norm and division, the N dot products of D terms and their mean: <= (2 D + 2 N + 4) u64
# of values <= 1, ~22 u64 for the D <= 5, N <= 6 here; twice that where both sides are computed (or the input rows
# come from cos / sin). 32 eps64 = 64 u64 ~ 7e-15 covers it.
F64_TOL = 32 * EPS64


def _two_rows_at(angle):
  """Two unit rows at +-angle from the x axis: their mean direction is the x axis, each cosine to it cos(angle)."""
  return np.array([[np.cos(angle), np.sin(angle)], [np.cos(angle), -np.sin(angle)]])


def test_mean_cosine_hand_cases():
  assert health.mean_cosine_to_mean(np.array([[3.0, 0.0], [0.0, 0.5]])) == pytest.approx(np.sqrt(0.5), abs=F64_TOL)
  assert health.mean_cosine_to_mean(_two_rows_at(np.arccos(0.3)) * [[2.0], [7.0]]) == pytest.approx(0.3, abs=F64_TOL)
  assert health.mean_cosine_to_mean(np.array([[1.0, 2.0]] * 4)) == pytest.approx(1.0, abs=F64_TOL)
  assert health.mean_cosine_to_mean(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 0.0  # no mean direction.


def test_mean_cosine_matches_the_definition_row_by_row():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 6)) + [3.0, 0, 0, 0, 0, 0]
  units = [r / np.linalg.norm(r) for r in x]
  mean = sum(units) / len(units)
  want = np.mean([u @ mean / np.linalg.norm(mean) for u in units])
  # Only the float32 rounding of x differs (the function computes in float64): each row moves by <= u |row|, its unit
  # vector by <= 2u, the mean of the unit rows by <= 2u and its direction by <= 4u / |mean| (|mean| = the mean cosine
  # itself), so the mean cosine moves by <= 2u (1 + 2 / want), u = 2^-24; float64 rounding adds ~1e-15.
  bound = 2 * U * (1 + 2 / want)
  assert health.mean_cosine_to_mean(x.astype(np.float32)) == pytest.approx(want, abs=bound)


def test_variance_quantiles_of_0_to_100():
  q = health.variance_quantiles(np.arange(101.0).reshape(1, 101))
  assert q == {"min": 0.0, "p5": 5.0, "median": 50.0, "p95": 95.0, "max": 100.0}
  stats = {"bnneck": {"mean": np.zeros(4), "var": np.array([4.0, 1.0, 3.0, 2.0])}, "layer1": {"var": np.ones(4)}}
  got = health.bnneck_variance_quantiles(stats)
  assert list(got) == ["bnneck"]
  # p5 of 1, 2, 3, 4: 1 + 0.05 * 3 in float64, two roundings (and 1.15's own): within 2 eps64 of 1.15.
  assert got["bnneck"]["median"] == 2.5 and got["bnneck"]["p5"] == pytest.approx(1.15, abs=2 * EPS64)


def test_embedding_health_per_part_and_per_modality():
  rng = np.random.default_rng(1)
  collapsed = np.tile(_two_rows_at(0.01), (3, 1))  # 6 rows, cosine cos(0.01) to their mean.
  spread = rng.normal(size=(6, 3))
  visible = np.concatenate([collapsed, spread], axis=1)
  infrared = rng.normal(size=(4, 5))
  sets = {"query": visible[:2], "gallery": visible[2:], "infrared": infrared}
  got = health.embedding_health(sets, {"query": "visible", "gallery": "visible", "infrared": "infrared"},
                                [("a", 2), ("b", 3)])
  assert list(got) == ["a", "b", health.WHOLE]
  assert got["a"]["visible"] == pytest.approx(np.cos(0.01), abs=F64_TOL)
  assert got["b"]["visible"] == pytest.approx(health.mean_cosine_to_mean(spread), abs=F64_TOL)
  assert got[health.WHOLE]["infrared"] == pytest.approx(health.mean_cosine_to_mean(infrared), abs=F64_TOL)
  with pytest.raises(ValueError, match="width 5 do not match the layout's 4"):
    health.embedding_health(sets, {"infrared": "infrared"}, [("a", 4)])


def test_warning_fires_above_the_threshold_and_not_at_or_below():
  for cosine, fires in ((0.96, True), (0.95, False), (0.94, False)):
    value = health.mean_cosine_to_mean(_two_rows_at(np.arccos(cosine)))
    lines = health.warnings({"nuance1/bnneck": {"visible": value, "infrared": 0.1}}, 0.95)
    assert bool(lines) is fires, cosine
    if fires:
      assert len(lines) == 1 and "nuance1/bnneck (visible 0.96000)" in lines[0]
      assert "infrared" not in lines[0].split("for ")[1].split(".")[0]
      assert "recalibrate_bn_batches" in lines[0]


def test_report_and_markdown_carry_the_warning_and_the_quantiles():
  sets = {"visible": np.tile(_two_rows_at(0.001), (2, 1)), "infrared": np.eye(2)}
  stats = {"bnneck": {"var": np.full(2, 1e-6)}}
  report = health.health_report(sets, {"visible": "visible", "infrared": "infrared"}, [("x", 2)], stats, 0.95,
                                checkpoint_batch_stats={"bnneck": {"var": np.full(2, 2e-6)}})
  assert len(report["warnings"]) == 1 and report["threshold"] == 0.95
  assert report["bnneck_running_var"]["bnneck"]["max"] == 1e-6
  assert report["bnneck_running_var_checkpoint"]["bnneck"]["min"] == 2e-6
  text = health.format_markdown(report)
  assert "**WARNING: collapsed test embeddings" in text and "| x | 0.70711 | 1.00000 |" in text
  assert "| bnneck | 1e-06 | 1e-06 | 1e-06 | 1e-06 | 1e-06 |" in text
