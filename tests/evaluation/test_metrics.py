"""compute_metrics and pairwise_distance against hand-worked cases and a per-query NumPy reference.

Hand-worked cases list the gallery as (pid, camera, distance) and give the kept ranked list, the 1-based ranks r_j of
the true matches, AP = mean_j j / r_j, INP = n / r_n and the first CMC hit, worked out by hand.
"""

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from fdnm_jax.evaluation import compute_metrics, pairwise_distance
from fdnm_jax.evaluation.metrics import euclidean_distance
from tests.rounding import U

# compute_metrics scores each query in float32 (metrics._precision_scores): AP = (sum_j fl(j / r_j)) / n rounds once
# per term, at most n - 1 times in the sum of the n positive terms and once in the division, so
# |AP - exact| <= (n + 1) u (AP <= 1); INP = n / r_n rounds once. The float64 mean over queries and the float64
# references add < 1e-13. At most 11 kept matches per query here (hand-worked cases 3, the hypothesis galleries 11
# items, the 600 x 40 case 8):
AP_TOL = (11 + 1) * U  # ~7.2e-7
# The CMC is the float64 mean of 0/1 flags (an exact integer sum, one division): fl(k / Q), the same float as the
# references' np.mean of the same flags (and exact for the dyadic hand values), so it is compared exactly.


def _gallery(*items):
  """(pid, camera, distance) triples -> g_pids, g_camids, one distance row."""
  pids, cams, dists = zip(*items)
  return np.array(pids), np.array(cams), np.array(dists, np.float32)


def _metrics(rows, q_pids, q_cams, g_pids, g_cams, protocol, **kw):
  return compute_metrics(np.array(rows, np.float32), np.array(q_pids), g_pids, np.array(q_cams), g_cams, protocol,
                         **kw)


def test_sysu_cam3_query_drops_every_cam2_item_whatever_its_identity():
  g_pids, g_cams, row = _gallery((2, 2, 0.1), (1, 2, 0.2), (1, 4, 0.3), (3, 1, 0.4), (1, 5, 0.5))
  # Query A (pid 1, cam 3): the cam-2 items of pid 2 AND of pid 1 go; kept list = pids [1, 3, 1].
  #   matches at r = 1, 3: AP = (1/1 + 2/3) / 2 = 5/6; INP = 2/3; identity list [1, 3] -> Rank-1 hit.
  # Query B (pid 1, cam 6): nothing removed; list = [2, 1, 1, 3, 1].
  #   matches at r = 2, 3, 5: AP = (1/2 + 2/3 + 3/5) / 3 = 53/90; INP = 3/5; identity list [2, 1, 3] -> hit at 2.
  m = _metrics([row, row], [1, 1], [3, 6], g_pids, g_cams, "sysu", max_rank=4)
  assert m["num_valid_queries"] == 2
  assert m["mAP"] == pytest.approx((5 / 6 + 53 / 90) / 2, abs=AP_TOL)
  assert m["mINP"] == pytest.approx((2 / 3 + 3 / 5) / 2, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [0.5, 1.0, 1.0, 1.0])


def test_sysu_keeps_same_pid_same_camera_items_as_agw():
  g_pids, g_cams, row = _gallery((1, 1, 0.1), (2, 1, 0.2), (1, 2, 0.3))
  # Query pid 1, cam 1 (not 3): AGW's eval_sysu removes nothing, so list = [1, 2, 1]:
  #   matches at r = 1, 3: AP = (1 + 2/3) / 2 = 5/6; INP = 2/3; Rank-1 hit.
  m = _metrics([row], [1], [1], g_pids, g_cams, "sysu", max_rank=3)
  assert m["mAP"] == pytest.approx(5 / 6, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(2 / 3, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [1.0, 1.0, 1.0])


def test_llcm_drops_same_pid_same_camera_items_only():
  g_pids, g_cams, row = _gallery((1, 1, 0.1), (2, 1, 0.2), (1, 2, 0.3))
  # Query pid 1, cam 1: item 0 (pid 1, cam 1) goes, item 1 (pid 2, cam 1) stays; kept list = [2, 1]:
  #   match at r = 2: AP = 1/2; INP = 1/2; identity list [2, 1] -> hit at 2.
  m = _metrics([row], [1], [1], g_pids, g_cams, "llcm", max_rank=3)
  assert m["mAP"] == pytest.approx(0.5, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(0.5, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [0.0, 1.0, 1.0])


def test_regdb_removes_nothing():
  g_pids, g_cams, row = _gallery((1, 1, 0.1), (2, 1, 0.2), (1, 2, 0.3))
  # Same input as the llcm case, but the list stays [1, 2, 1]: matches at 1, 3: AP = 5/6, INP = 2/3.
  m = _metrics([row], [1], [1], g_pids, g_cams, "regdb", max_rank=3)
  assert m["mAP"] == pytest.approx(5 / 6, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(2 / 3, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [1.0, 1.0, 1.0])


def test_identity_deduplication_changes_cmc_but_not_ap():
  g_pids, g_cams, row = _gallery((2, 1, 0.1), (2, 1, 0.2), (2, 4, 0.3), (1, 5, 0.4), (3, 1, 0.5))
  # Query pid 1, cam 6; nothing removed under any protocol; image list = [2, 2, 2, 1, 3]: one match at r = 4,
  # AP = INP = 1/4 for all three. sysu/llcm CMC: identity list [2, 1, 3] -> hit at 2; regdb: hit at 4.
  for protocol, cmc in (("sysu", [0, 1, 1, 1, 1]), ("llcm", [0, 1, 1, 1, 1]), ("regdb", [0, 0, 0, 1, 1])):
    m = _metrics([row], [1], [6], g_pids, g_cams, protocol, max_rank=5)
    assert m["mAP"] == pytest.approx(0.25, abs=AP_TOL), protocol
    assert m["mINP"] == pytest.approx(0.25, abs=AP_TOL), protocol
    np.testing.assert_array_equal(m["cmc"], cmc, err_msg=protocol)


def test_queries_without_a_kept_match_are_skipped_not_counted_as_misses():
  g_pids, g_cams, row = _gallery((1, 1, 0.5), (2, 2, 0.1), (3, 4, 0.3))
  # Query A (pid 1, cam 6): list [2, 3, 1], match at r = 3: AP = INP = 1/3, identity hit at 3.
  # Query B (pid 9): not in the gallery -> skipped. Query C (pid 2, cam 3): its only image is cam 2, removed ->
  # skipped. So 1 valid query; counting B and C as misses would give Rank-3 = 1/3 instead of 1.
  m = _metrics([row, row, row], [1, 9, 2], [6, 6, 3], g_pids, g_cams, "sysu", max_rank=4)
  assert m["num_valid_queries"] == 1
  assert m["mAP"] == pytest.approx(1 / 3, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(1 / 3, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [0, 0, 1, 1])


def test_minp_is_matches_over_rank_of_the_hardest_match():
  g_pids, g_cams, _ = _gallery((1, 2, 0), (1, 2, 0), (2, 2, 0), (3, 2, 0), (1, 2, 0))
  rows = [[0.1, 0.2, 0.3, 0.4, 0.5],  # query 1 (pid 1): list [1, 1, 2, 3, 1], matches at 1, 2, 5
          [0.5, 0.1, 0.2, 0.3, 0.4]]  # query 2 (pid 3): list [1, 2, 3, 1, 1], match at 3
  # Query 1: AP = (1/1 + 2/2 + 3/5) / 3 = 13/15; INP = 3/5. Query 2: AP = INP = 1/3.
  # mAP = (13/15 + 1/3) / 2 = 3/5; mINP = (3/5 + 1/3) / 2 = 7/15; regdb CMC: hits at 1 and 3.
  m = _metrics(rows, [1, 3], [1, 1], g_pids, g_cams, "regdb", max_rank=3)
  assert m["mAP"] == pytest.approx(3 / 5, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(7 / 15, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [0.5, 0.5, 1.0])


def test_cmc_is_padded_with_its_last_value_past_a_short_list():
  g_pids, g_cams, row = _gallery((2, 1, 0.1), (1, 1, 0.2), (2, 4, 0.3))
  # 3 gallery items, max_rank 20. regdb list [2, 1, 2]: hit at 2 -> [0, 1, 1] then 1 up to rank 20.
  # sysu identity list [2, 1] (2 entries): hit at 2 -> [0, 1] then 1 up to rank 20.
  for protocol in ("regdb", "sysu"):
    m = _metrics([row], [1], [6], g_pids, g_cams, protocol)
    np.testing.assert_array_equal(m["cmc"], [0.0] + [1.0] * 19, err_msg=protocol)
    assert m["mAP"] == pytest.approx(0.5, abs=AP_TOL)


def test_ties_are_broken_by_gallery_order():
  # All distances equal: the list is the gallery order [2, 1, 1]: matches at 2, 3, AP = (1/2 + 2/3) / 2 = 7/12,
  # INP = 2/3, regdb hit at 2. (Reversing the gallery would put the matches first: AP 1.)
  g_pids, g_cams, row = _gallery((2, 1, 0.5), (1, 1, 0.5), (1, 1, 0.5))
  m = _metrics([row], [1], [6], g_pids, g_cams, "regdb", max_rank=3)
  assert m["mAP"] == pytest.approx(7 / 12, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(2 / 3, abs=AP_TOL)
  np.testing.assert_array_equal(m["cmc"], [0, 1, 1])
  # -0.0 == 0.0 (as NumPy compares them): the later 0.0 match stays second, AP = 1/2 (a bitwise order gives 1).
  g_pids, g_cams, row = _gallery((2, 1, 0.0), (1, 1, -0.0))
  m = _metrics([row], [1], [6], g_pids, g_cams, "regdb", max_rank=2)
  assert m["mAP"] == pytest.approx(0.5, abs=AP_TOL)
  # A subnormal distance is not a tie with 0.0 (XLA's CPU float compare would flush it): list [2, 1], AP = 1/2.
  g_pids, g_cams, row = _gallery((1, 1, 1e-40), (2, 1, 0.0))
  m = _metrics([row], [1], [6], g_pids, g_cams, "regdb", max_rank=2)
  assert m["mAP"] == pytest.approx(0.5, abs=AP_TOL)


def test_no_valid_query_is_an_error():
  g_pids, g_cams, row = _gallery((1, 2, 0.1), (2, 2, 0.2))
  # pid 1 only has a cam-2 image, removed for a cam-3 query; pid 7 is not in the gallery.
  with pytest.raises(ValueError, match="no query has a true match"):
    _metrics([row, row], [1, 7], [3, 6], g_pids, g_cams, "sysu")


def test_unknown_protocol_and_bad_shapes_are_errors():
  g_pids, g_cams, row = _gallery((1, 1, 0.1), (2, 2, 0.2))
  with pytest.raises(ValueError, match="'market'.*'sysu', 'regdb', 'llcm'"):
    _metrics([row], [1], [3], g_pids, g_cams, "market")
  with pytest.raises(ValueError, match="g_pids must have shape"):
    _metrics([row], [1], [3], g_pids[:1], g_cams, "sysu")


def _reference(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank):
  """The metrics from their definitions, one query at a time; None when no query has a kept true match."""
  cmcs, aps, inps = [], [], []
  for i in range(len(q_pids)):
    ranked = []
    for g in np.argsort(dist[i], kind="stable"):
      sysu_drop = protocol == "sysu" and q_cams[i] == 3 and g_cams[g] == 2
      llcm_drop = protocol == "llcm" and g_pids[g] == q_pids[i] and g_cams[g] == q_cams[i]
      if not (sysu_drop or llcm_drop):
        ranked.append(g_pids[g])
    positions = [r for r, pid in enumerate(ranked, start=1) if pid == q_pids[i]]
    if not positions:
      continue
    aps.append(np.mean([j / r for j, r in enumerate(positions, start=1)]))
    inps.append(len(positions) / positions[-1])
    labels = ranked
    if protocol != "regdb":
      labels = [pid for k, pid in enumerate(ranked) if pid not in ranked[:k]]
    curve = list(np.minimum(np.cumsum([pid == q_pids[i] for pid in labels]), 1)[:max_rank])
    cmcs.append(curve + [curve[-1]] * (max_rank - len(curve)))
  if not aps:
    return None
  return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps), len(aps)


_DISTANCES = [0.0, -0.0, 0.25, 0.5, 0.5, 0.5, 1.0, -1.0, 3.0, np.inf, np.nan]
_CAMERAS = {"sysu": [1, 2, 3, 4, 5, 6], "regdb": [1, 2], "llcm": [1, 2, 3]}


@st.composite
def _retrievals(draw):
  protocol = draw(st.sampled_from(sorted(_CAMERAS)))
  num_query = draw(st.integers(5, 9))
  num_gallery = draw(st.sampled_from([6, 11]))
  value = st.one_of(st.sampled_from(_DISTANCES), st.floats(-2, 2, width=32))
  dist = np.array(draw(st.lists(value, min_size=num_query * num_gallery, max_size=num_query * num_gallery)),
                  np.float32).reshape(num_query, num_gallery)
  ints = lambda n, values: np.array(draw(st.lists(st.sampled_from(values), min_size=n, max_size=n)))
  q_pids, g_pids = ints(num_query, range(5)), ints(num_gallery, range(4))
  q_cams, g_cams = ints(num_query, _CAMERAS[protocol]), ints(num_gallery, _CAMERAS[protocol])
  max_rank = draw(st.sampled_from([3, 20]))
  return dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank


@settings(max_examples=80, deadline=None)
@given(_retrievals())
def test_matches_per_query_reference(case):
  dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank = case
  expected = _reference(*case)
  if expected is None:
    with pytest.raises(ValueError, match="no query has a true match"):
      compute_metrics(*case, query_chunk=4)
    return
  m = compute_metrics(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank=max_rank, query_chunk=4)
  cmc, mean_ap, mean_inp, num_valid = expected
  np.testing.assert_array_equal(m["cmc"], cmc)
  assert m["mAP"] == pytest.approx(mean_ap, abs=AP_TOL)
  assert m["mINP"] == pytest.approx(mean_inp, abs=AP_TOL)
  assert m["num_valid_queries"] == num_valid


@pytest.mark.parametrize("protocol", ["sysu", "llcm"])
def test_several_row_blocks_and_chunks_match_reference(protocol):
  # 600 queries, query_chunk 300 -> chunks of 512 queries scored in two blocks of 256: the second chunk is mostly
  # padding, and the queries are reordered by work before scoring. distmat as a JAX array.
  rng = np.random.default_rng(0)
  dist = rng.integers(0, 6, (600, 40)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, 12, 600), rng.integers(0, 10, 40)
  q_cams, g_cams = rng.integers(1, 7, 600), rng.integers(1, 7, 40)
  m = compute_metrics(jnp.asarray(dist), q_pids, g_pids, q_cams, g_cams, protocol, max_rank=10, query_chunk=300)
  cmc, mean_ap, mean_inp, num_valid = _reference(dist, q_pids, g_pids, q_cams, g_cams, protocol, 10)
  np.testing.assert_array_equal(m["cmc"], cmc)
  assert (m["mAP"], m["mINP"], m["num_valid_queries"]) == (pytest.approx(mean_ap, abs=AP_TOL),
                                                            pytest.approx(mean_inp, abs=AP_TOL), num_valid)


def test_pairwise_distance_is_minus_the_plain_dot_product_and_euclidean_the_plain_norm():
  rng = np.random.default_rng(0)
  q, g = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))
  g[1] *= 100.0  # the references do not re-normalise: the scale counts.
  d = pairwise_distance(jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32))
  assert d.shape == (3, 5) and d.dtype == jnp.float32
  # float32 products summed: error within a few ulps of sum |q_i g_i| (the bound below, with a 16x margin).
  bound = 1e-6 * np.abs(q) @ np.abs(g).T
  assert np.all(np.abs(np.asarray(d) + np.array([[a @ b for b in g] for a in q])) <= bound)
  e = euclidean_distance(jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32))
  # sqrt(|q|^2 + |g|^2 - 2 q.g) in float32: no near-duplicate rows here, so no cancellation beyond 1e-5 relative.
  np.testing.assert_allclose(np.asarray(e), [[np.linalg.norm(a - b) for b in g] for a in q], rtol=1e-5)
