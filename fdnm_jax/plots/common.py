"""Shared plotting set-up: the Agg backend, exact pixel sizes, labels of modalities and cameras."""

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot.
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

DPI = 100  # pixels per inch of every saved figure: a figure of w x h inches is exactly (w*DPI) x (h*DPI) pixels.
MODALITY_SHORT = {0: "V", 1: "IR"}  # ImageSet.modality -> label prefix.


def camera_label(modality: int, camera: int) -> str:
  """'V cam2' or 'IR cam3'."""
  return f"{MODALITY_SHORT[int(modality)]} cam{int(camera)}"


def save(fig: "plt.Figure", path: str) -> str:
  """Saves `fig` as a PNG of exactly figsize * DPI pixels (no tight bbox) and closes it; returns `path`."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  plt.close(fig)
  return path
