"""re_ranking on small hand-checkable inputs: points on a line, Euclidean distances."""

import numpy as np
import pytest

from fdnm_jax.evaluation import re_ranking


def _distances(a, b):
  return np.abs(np.asarray(a, np.float32)[:, None] - np.asarray(b, np.float32)[None, :])


def test_lambda_one_gives_the_squared_row_scaled_original_distance():
  q, g = [0.0, 1.0], [0.5, 2.0, 4.0]
  # Query 0.0: distances to queries [0, 1], to gallery [0.5, 2, 4]; squared, divided by the row's largest (16):
  #   [0.25, 4, 16] / 16. Query 1.0: to queries [1, 0], gallery [0.5, 1, 3] -> squared / 9: [0.25, 1, 9] / 9.
  out = re_ranking(_distances(q, g), _distances(q, q), _distances(g, g), k1=2, k2=1, lambda_value=1.0)
  assert out.shape == (2, 3) and out.dtype == np.float32
  # lambda 1: out = jaccard * 0 + original * 1, exactly the float32 original. Its squares (0.25, 1, 4, 9, 16) are
  # exact, so each entry is one float32 division of exact values, correctly rounded: the same float32 quotients
  # computed here. Compared exactly.
  squared = np.array([[0.25, 4.0, 16.0], [0.25, 1.0, 9.0]], np.float32)
  np.testing.assert_array_equal(out, squared / np.array([[16.0], [9.0]], np.float32))


def test_reranking_puts_a_k_reciprocal_neighbour_before_a_closer_distractor():
  # Query at 0; distractor d at -0.9 with its own group at -1.5, -1.6, -1.7; true matches at 1.0, 1.05, 1.1.
  # With k1 = 3: the 4 nearest of the query are (itself, d, 1.0, 1.05), but d's 4 nearest are (d, its group)
  # without the query, while 1.0's are (1.0, 1.05, 1.1, query): d is not a k-reciprocal neighbour, 1.0 is,
  # so the Jaccard distance ranks 1.0 first although d is nearer.
  q, g = [0.0], [-0.9, 1.0, 1.05, 1.1, -1.5, -1.6, -1.7]
  q_g = _distances(q, g)
  assert np.argmin(q_g[0]) == 0
  out = re_ranking(q_g, _distances(q, q), _distances(g, g), k1=3, k2=1, lambda_value=0.3)
  assert np.argmin(out[0]) == 1


def test_negative_distances_are_rejected():
  with pytest.raises(ValueError, match="non-negative"):
    re_ranking(-np.ones((1, 2)), np.zeros((1, 1)), np.zeros((2, 2)))
