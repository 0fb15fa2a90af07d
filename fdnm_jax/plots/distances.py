"""Cross-modality distance histograms: same-identity (intra-class) vs different-identity (inter-class) pairs.

Distances are Euclidean between L2-normalised embeddings, d = sqrt(2 - 2 cos) in [0, 2] (the monotone image of the
evaluator's -cos, so the ranking is the same). Only cross-modality pairs (query of one modality, gallery of the
other) that the protocol ranks are counted (`ranklist.kept_gallery`).

Overlap: with p and q the two histograms over the same bins, each normalised to sum 1, overlap = sum_i min(p_i, q_i)
(the shared area of the two normalised histograms): 1 = identical distributions, 0 = perfectly separated. The bins
are config.visualize.num_bins equal-width bins from the smallest to the largest distance of the panel (intra and
inter together; `panel_bins`): trained embeddings often share a large common component, so all their distances sit
in a small part of [0, 2] and fixed bins over [0, 2] would put them in one bin.
"""

from typing import Sequence

import numpy as np

from fdnm_jax.plots.common import DPI, plt, save

PANEL_WIDTH = 5.0  # inches per column (one workdir).
PANEL_HEIGHT = 3.2  # inches per row (one protocol setting).
INTRA, INTER = "#1a9e1a", "#d62020"  # colours of the intra- and inter-class histograms.


def figure_size(num_settings: int, num_runs: int) -> tuple[int, int]:
  """(width, height) in pixels of a histogram figure: one row per setting, one column per run."""
  return round(num_runs * PANEL_WIDTH * DPI), round(num_settings * PANEL_HEIGHT * DPI)


def l2_distances(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
  """float64 [Q, G]: Euclidean distances of the L2-normalised rows, sqrt(max(0, 2 - 2 cos))."""
  q = np.asarray(query_emb, np.float64)
  g = np.asarray(gallery_emb, np.float64)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * q @ g.T))


def intra_inter(dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
  """(intra, inter): the kept distances of same-identity and of different-identity pairs, flattened.

  Args:
    dist: [Q, G] distances; q_pids [Q], g_pids [G]; kept: bool [Q, G] pairs the protocol ranks.
  """
  same = np.asarray(q_pids)[:, None] == np.asarray(g_pids)[None, :]
  return dist[same & kept], dist[~same & kept]


def overlap(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
  """Shared area of the normalised histograms of `a` and `b` over `bins` (edges): sum_i min(p_i, q_i)."""
  p, _ = np.histogram(a, bins=bins)
  q, _ = np.histogram(b, bins=bins)
  if p.sum() == 0 or q.sum() == 0:
    return float("nan")
  return float(np.minimum(p / p.sum(), q / q.sum()).sum())


def panel_bins(intra: np.ndarray, inter: np.ndarray, num_bins: int) -> np.ndarray:
  """num_bins + 1 equal-width edges from the smallest to the largest distance of intra and inter together."""
  both = np.concatenate([np.ravel(intra), np.ravel(inter)])
  lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 2.0)
  if hi - lo < 1e-12:
    lo, hi = lo - 1e-6, hi + 1e-6
  return np.linspace(lo, hi, int(num_bins) + 1)


def summary(intra: np.ndarray, inter: np.ndarray, bins: np.ndarray) -> dict:
  """{"intra_mean", "inter_mean", "overlap", "num_intra", "num_inter"} of one setting."""
  return {"intra_mean": float(np.mean(intra)) if len(intra) else float("nan"),
          "inter_mean": float(np.mean(inter)) if len(inter) else float("nan"),
          "overlap": overlap(intra, inter, bins), "num_intra": int(len(intra)), "num_inter": int(len(inter))}


def plot_histograms(path: str, panels: Sequence[Sequence[dict]], run_names: Sequence[str],
                    setting_names: Sequence[str]) -> str:
  """Writes the histogram PNG: panels[row = setting][column = run] = {"intra", "inter" (arrays), "bins" (edges),
  "summary" (`summary` over those bins)}.

  Each panel shows both normalised histograms (density), their means as dashed lines and the overlap in the title.
  The PNG is `figure_size(len(setting_names), len(run_names))` pixels.
  """
  width, height = figure_size(len(setting_names), len(run_names))
  fig, axes = plt.subplots(len(setting_names), len(run_names), figsize=(width / DPI, height / DPI), squeeze=False)
  for r, setting in enumerate(setting_names):
    for c, run in enumerate(run_names):
      ax, panel = axes[r, c], panels[r][c]
      s, bins = panel["summary"], panel["bins"]
      ax.hist(panel["intra"], bins=bins, density=True, alpha=0.55, color=INTRA,
              label=f"intra-class (same id), n={s['num_intra']}")
      ax.hist(panel["inter"], bins=bins, density=True, alpha=0.55, color=INTER,
              label=f"inter-class, n={s['num_inter']}")
      ax.axvline(s["intra_mean"], color=INTRA, linestyle="--", label=f"intra mean {s['intra_mean']:.3f}")
      ax.axvline(s["inter_mean"], color=INTER, linestyle="--", label=f"inter mean {s['inter_mean']:.3f}")
      ax.set_title(f"{run}: {setting}\noverlap {s['overlap']:.3f}", fontsize=8)
      ax.set_xlabel("Euclidean distance of L2-normalised embeddings", fontsize=7)
      ax.set_ylabel("density", fontsize=7)
      ax.tick_params(labelsize=6)
      ax.legend(fontsize=6, loc="best", framealpha=0.6)
  fig.tight_layout()
  return save(fig, path)
