"""The per-query NumPy loop of AGW's `eval_metrics.py` (`eval_sysu`, `eval_regdb`) and DEEN's `eval_llcm`.

Used by benchmarks/evaluator.py as the baseline to time against and to check the numbers. It follows the same
steps as those functions (argsort of the whole matrix, then per query: keep mask, `np.unique` de-duplication,
cumsum, a Python list for the precisions) with two changes, both no-ops on inputs where AGW runs deterministically:
the argsort is stable (AGW's default quicksort leaves the order of tied distances unspecified), and a CMC shorter
than max_rank is padded with its last value (AGW fails to stack it).
"""

import numpy as np


def _pad(curve: np.ndarray, max_rank: int) -> np.ndarray:
  curve = curve[:max_rank]
  return np.concatenate([curve, np.full(max_rank - len(curve), curve[-1] if len(curve) else 0)])


def _loop(distmat, q_pids, g_pids, keep_fn, dedup: bool, max_rank: int):
  """AGW's loop; keep_fn(q_idx, order) -> bool mask of the ranked gallery items the query keeps."""
  indices = np.argsort(distmat, axis=1, kind="stable")
  pred_label = g_pids[indices]
  matches = (pred_label == q_pids[:, np.newaxis]).astype(np.int32)
  all_cmc, all_ap, all_inp = [], [], []
  num_valid_q = 0.0
  for q_idx in range(distmat.shape[0]):
    keep = keep_fn(q_idx, indices[q_idx])
    if dedup:
      labels = pred_label[q_idx][keep]
      first = np.unique(labels, return_index=True)[1]
      labels = np.asarray([labels[i] for i in sorted(first)])
      id_cmc = (labels == q_pids[q_idx]).astype(np.int32).cumsum()
    raw_cmc = matches[q_idx][keep]
    if not np.any(raw_cmc):
      continue
    cmc = raw_cmc.cumsum()
    last = np.max(np.where(raw_cmc == 1))
    all_inp.append(cmc[last] / (last + 1.0))
    cmc[cmc > 1] = 1
    all_cmc.append(_pad(id_cmc if dedup else cmc, max_rank))
    num_valid_q += 1.0
    hits = raw_cmc.cumsum()
    precisions = np.asarray([x / (i + 1.0) for i, x in enumerate(hits)]) * raw_cmc
    all_ap.append(precisions.sum() / raw_cmc.sum())
  assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
  all_cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / num_valid_q
  return all_cmc, np.mean(all_ap), np.mean(all_inp)


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
  """AGW: a camera-3 query drops every camera-2 gallery item; CMC over distinct identities."""
  keep_fn = lambda q, order: np.invert((q_camids[q] == 3) & (g_camids[order] == 2))
  return _loop(distmat, q_pids, g_pids, keep_fn, dedup=True, max_rank=max_rank)


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
  """DEEN: drop the gallery items of the query's pid and camera; CMC over distinct identities."""
  keep_fn = lambda q, order: np.invert((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
  return _loop(distmat, q_pids, g_pids, keep_fn, dedup=True, max_rank=max_rank)


def eval_regdb(distmat, q_pids, g_pids, max_rank=20):
  """AGW: nothing removed (query camera 1, gallery camera 2); CMC over the image list."""
  keep_fn = lambda q, order: np.ones(len(order), bool)
  return _loop(distmat, q_pids, g_pids, keep_fn, dedup=False, max_rank=max_rank)
