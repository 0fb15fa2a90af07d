"""Rank-list figures: each query beside its top-k gallery images, true matches framed green, others red."""

from typing import Sequence

import numpy as np
from PIL import Image

from fdnm_jax.evaluation import metrics
from fdnm_jax.plots.common import DPI, camera_label, plt, save

CELL_WIDTH = 1.2  # inches per image column.
ROW_HEIGHT = 2.6  # inches per query row (image and three caption lines).
CORRECT, WRONG, QUERY = "#1a9e1a", "#d62020", "#202020"  # frame colours: true match, other identity, the query.


def figure_size(num_queries: int, top_k: int) -> tuple[int, int]:
  """(width, height) in pixels of a rank list of `num_queries` rows: 1 query + top_k columns."""
  return round((top_k + 1) * CELL_WIDTH * DPI), round(num_queries * ROW_HEIGHT * DPI)


def kept_gallery(protocol: str, q_pid: int, q_cam: int, g_pids: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
  """bool [G]: the gallery items a query is ranked against under `protocol` (the evaluator's rule, `metrics`):
  sysu drops camera-2 items for a camera-3 query; llcm drops the query's own (identity, camera); regdb keeps all."""
  return np.asarray(metrics._kept(np, protocol, np.int32(q_pid), np.int32(q_cam),  # pylint: disable=protected-access
                                  np.asarray(g_pids), np.asarray(g_cams)), bool)


def top_k(dist_row: np.ndarray, kept: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k smallest distances among the kept gallery items, ascending (ties: lower index first)."""
  candidates = np.flatnonzero(kept)
  order = np.argsort(dist_row[candidates], kind="stable")
  return candidates[order[:k]]


def _show(ax, path: str, colour: str, title: str) -> None:
  with Image.open(path) as im:
    ax.imshow(np.asarray(im.convert("RGB")))
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(4)
  ax.set_title(title, fontsize=7, color=colour)


def plot_rank_list(path: str, query_rows: Sequence[dict], k: int, title: str) -> str:
  """Writes a rank-list PNG.

  Args:
    path: the PNG to write; its size is `figure_size(len(query_rows), k)` pixels.
    query_rows: per query {"path", "pid", "label" (e.g. "IR cam3"), "gallery": [{"path", "pid", "label",
      "distance"}] (the top-k, best first; fewer leaves blank cells)}.
    k: columns of gallery images; title: the figure's title.
  Returns:
    path.
  """
  n = len(query_rows)
  width, height = figure_size(n, k)
  fig, axes = plt.subplots(n, k + 1, figsize=(width / DPI, height / DPI), squeeze=False)
  for r, q in enumerate(query_rows):
    _show(axes[r, 0], q["path"], QUERY, f"QUERY id {q['pid']}\n{q['label']}")
    for c in range(k):
      ax = axes[r, c + 1]
      if c >= len(q["gallery"]):
        ax.axis("off")
        continue
      g = q["gallery"][c]
      colour = CORRECT if g["pid"] == q["pid"] else WRONG
      _show(ax, g["path"], colour, f"{c + 1}: id {g['pid']}\n{g['label']}\nd={g['distance']:.3f}")
  fig.suptitle(title + "  (green = same identity, red = other)", fontsize=9)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.95 / (height / DPI), wspace=0.08, hspace=0.55)
  return save(fig, path)


def query_row(q_path: str, q_pid: int, q_label: str, dist_row: np.ndarray, kept: np.ndarray, k: int,
              g_paths: Sequence[str], g_pids: np.ndarray, g_mod: int, g_cams: np.ndarray) -> dict:
  """The `plot_rank_list` row of one query from its distance row to the gallery."""
  best = top_k(dist_row, kept, k)
  return {"path": q_path, "pid": int(q_pid), "label": q_label,
          "gallery": [{"path": g_paths[j], "pid": int(g_pids[j]), "label": camera_label(g_mod, g_cams[j]),
                       "distance": float(dist_row[j]), "index": int(j)} for j in best]}
