"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017).

On the host in NumPy: it needs the (Q + G) x (Q + G) distances of queries and gallery together, O((Q + G)^2) memory
(SYSU-MM01 multi-shot: about 0.6 GB).
"""

import numpy as np


def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
  """The items among the k + 1 nearest of item i that have i among their own k + 1 nearest."""
  forward = initial_rank[i, :k + 1]
  backward = initial_rank[forward, :k + 1]
  return forward[np.any(backward == i, axis=1)]


def _expanded_set(initial_rank: np.ndarray, i: int, k1: int) -> np.ndarray:
  """R*(i, k1): R(i, k1) joined with each R(c, k1/2), c in R(i, k1), that shares over 2/3 of its items with it."""
  reciprocal = _k_reciprocal(initial_rank, i, k1)
  expansion = [reciprocal]
  for candidate in reciprocal:
    candidate_set = _k_reciprocal(initial_rank, candidate, int(np.around(k1 / 2.0)))
    if len(np.intersect1d(candidate_set, reciprocal)) > 2.0 / 3.0 * len(candidate_set):
      expansion.append(candidate_set)
  return np.unique(np.concatenate(expansion))


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked query-gallery distances: (1 - lambda) * Jaccard distance of the k-reciprocal sets + lambda * original.

  As the paper's released code: the distances are squared and divided by the largest of their row (over queries and
  gallery), neighbours are ranked with ties in index order, the k-reciprocal sets R*(i, k1) are weighted by
  exp(-distance) and averaged over the k2 nearest neighbours (local query expansion).

  Args:
    q_g_dist: float [Q, G], q_q_dist: float [Q, Q], g_g_dist: float [G, G] non-negative distances, e.g. the
      Euclidean distance of the embeddings (`metrics.euclidean_distance`).
    k1, k2: neighbourhood sizes of the k-reciprocal sets and of the query expansion.
    lambda_value: weight of the original distance; 1 gives the squared, row-scaled original distance.
  Returns:
    float32 [Q, G] distances, smaller = more similar.
  Raises:
    ValueError: a negative distance (the squaring would break the ranking).
  """
  q_g_dist, q_q_dist, g_g_dist = (np.asarray(d, np.float32) for d in (q_g_dist, q_q_dist, g_g_dist))
  if min(q_g_dist.min(initial=0), q_q_dist.min(initial=0), g_g_dist.min(initial=0)) < 0:
    raise ValueError("re_ranking needs non-negative distances: pass the Euclidean distances of the "
                     "embeddings (metrics.euclidean_distance), not pairwise_distance's negative dot products")
  num_query = q_g_dist.shape[0]
  original = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]) ** 2
  original = original / np.maximum(original.max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
  initial_rank = np.argsort(original, axis=1, kind="stable")
  weights = np.zeros_like(original)
  for i in range(len(original)):
    members = _expanded_set(initial_rank, i, k1)
    w = np.exp(-original[i, members])
    weights[i, members] = w / w.sum()
  if k2 > 1:
    weights = weights[initial_rank[:, :k2]].mean(axis=1)
  jaccard = np.empty_like(q_g_dist)
  for i in range(num_query):
    overlap = np.minimum(weights[i][None, :], weights[num_query:]).sum(axis=1)
    jaccard[i] = 1.0 - overlap / (2.0 - overlap)
  return (jaccard * (1.0 - lambda_value) + original[:num_query, num_query:] * lambda_value).astype(np.float32)
