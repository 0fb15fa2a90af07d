"""t-SNE scatter of query and gallery embeddings: colour = identity, marker = modality.

The embedding is scikit-learn's `sklearn.manifold.TSNE` (Barnes-Hut, 2-D, PCA init, a fixed random_state) of the
L2-normalised embeddings; perplexity = min(config.visualize.tsne_perplexity, (n - 1) / 3), so that small sets work
(scikit-learn requires perplexity < n).
"""

import numpy as np

from fdnm_jax.errors import DataError
from fdnm_jax.plots.common import DPI, MODALITY_SHORT, plt, save

SIZE = 7.0  # inches, square figure.
MARKERS = {0: "o", 1: "^"}  # ImageSet.modality -> marker: visible circle, infrared triangle.


def figure_size() -> tuple[int, int]:
  """(width, height) in pixels of a t-SNE figure."""
  return round(SIZE * DPI), round(SIZE * DPI)


def embed_2d(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  """float64 [n, 2] t-SNE coordinates of the L2-normalised rows of `x` [n, E] (n >= 4)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top  (only the visualize mode needs it)
  x = np.asarray(x, np.float64)
  if len(x) < 4:
    raise DataError(f"t-SNE needs at least 4 points, got {len(x)}")
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  perplexity = float(min(perplexity, (len(x) - 1) / 3.0))
  return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_tsne(path: str, coords: np.ndarray, pids: np.ndarray, modalities: np.ndarray, title: str) -> str:
  """Writes the scatter PNG (`figure_size()` pixels): one colour per identity, marker by modality."""
  pids, modalities = np.asarray(pids), np.asarray(modalities)
  ids = np.unique(pids)
  cmap = plt.get_cmap("tab10" if len(ids) <= 10 else "tab20" if len(ids) <= 20 else "hsv", max(len(ids), 1))
  colour = {p: cmap(i) for i, p in enumerate(ids)}
  width, height = figure_size()
  fig, ax = plt.subplots(figsize=(width / DPI, height / DPI))
  for m, marker in MARKERS.items():
    sel = modalities == m
    if sel.any():
      ax.scatter(coords[sel, 0], coords[sel, 1], c=[colour[p] for p in pids[sel]], marker=marker, s=36,
                 edgecolors="black", linewidths=0.4, label=f"{MODALITY_SHORT[m]} ({'visible' if m == 0 else 'infrared'})")
  ax.set_title(f"{title}\n{len(ids)} identities, colour = identity", fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  return save(fig, path)
