"""--mode=visualize: the pure pieces against hand-worked cases, and end to end on the tiny synthetic run (PNG sizes,
the numbers of summary.json against a NumPy recomputation from the evaluator's embeddings)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fdnm_jax import visualize
from fdnm_jax.plots import distances, ranklist, tsne
from tests.rounding import EPS64
from tests.test_inference import evaluator_embeddings, trained_workdir


def test_parse_queries():
  np.testing.assert_array_equal(visualize.parse_queries("3", 9), [0, 4, 8])
  np.testing.assert_array_equal(visualize.parse_queries("20", 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(visualize.parse_queries("5,", 9), [5])
  np.testing.assert_array_equal(visualize.parse_queries(" 7, 1 ,2", 9), [7, 1, 2])
  with pytest.raises(ValueError, match=r"positions \[9\] outside 0..8"):
    visualize.parse_queries("1,9", 9)
  with pytest.raises(ValueError, match="count n or comma-separated"):
    visualize.parse_queries("a,b", 9)
  with pytest.raises(ValueError, match="at least 1"):
    visualize.parse_queries("0", 9)


def test_overlap_is_the_shared_area_of_the_normalised_histograms():
  bins = np.array([0.0, 1.0, 2.0, 3.0])
  # a: 3 in bin 0, 1 in bin 1 -> p = (.75, .25, 0); b: 1 in bin 1, 1 in bin 2 -> q = (0, .5, .5); min sum = .25.
  # Exactly: every fraction and bin edge here is a dyadic number, computed without rounding.
  assert distances.overlap(np.array([0.1, 0.2, 0.3, 1.5]), np.array([1.2, 2.5]), bins) == 0.25
  assert distances.overlap(np.array([0.5]), np.array([0.6]), bins) == 1.0
  assert distances.overlap(np.array([0.5]), np.array([2.5]), bins) == 0.0
  np.testing.assert_array_equal(distances.panel_bins(np.array([1.0]), np.array([3.0, 2.0]), 4), [1, 1.5, 2, 2.5, 3])


def float64_distance_bound(dim: int) -> float:
  """How far two float64 formulas of the distance between the same unit vectors of `dim` entries can be apart:
  sqrt(2 - 2 cos) (fdnm_jax/plots/distances.py) against |q - g|. The dot product is off by <= dim * eps64, so the
  squared distance by <= 2 * dim * eps64; at d = 0 (the worst case: the square root of the cancellation) that
  leaves sqrt(2 * dim * eps64), e.g. 2.1e-8 for dim 1, 3.4e-7 for dim 256; at d >= 0.1 below 1e-11."""
  return float(np.sqrt(2 * dim * EPS64))


def test_l2_distances_intra_inter_and_top_k():
  q = np.array([[3.0, 0.0], [0.0, 2.0]])
  g = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
  # Unit vectors: |(1,0) - (1,1)/sqrt2| = sqrt(2 - sqrt2).
  want = np.array([[0.0, np.sqrt(2 - np.sqrt(2)), np.sqrt(2)], [np.sqrt(2), np.sqrt(2 - np.sqrt(2)), 0.0]])
  d = distances.l2_distances(q, g)
  tol = float64_distance_bound(2)
  np.testing.assert_allclose(d, want, rtol=0, atol=tol)
  kept = np.array([[True, True, False], [True, True, True]])
  intra, inter = distances.intra_inter(d, np.array([1, 2]), np.array([1, 2, 2]), kept)
  np.testing.assert_allclose(np.sort(intra), np.sort([0.0, want[1, 1], 0.0]), rtol=0, atol=tol)
  np.testing.assert_allclose(np.sort(inter), np.sort([want[0, 1], np.sqrt(2)]), rtol=0, atol=tol)
  np.testing.assert_array_equal(ranklist.top_k(np.array([0.3, 0.1, 0.2, 0.1]), np.array([1, 1, 0, 1], bool), 2),
                                [1, 3])


def test_kept_gallery_follows_the_protocol_rules():
  g_pids, g_cams = np.array([1, 1, 2, 1]), np.array([2, 1, 2, 3])
  np.testing.assert_array_equal(ranklist.kept_gallery("sysu", 1, 3, g_pids, g_cams), [False, True, False, True])
  np.testing.assert_array_equal(ranklist.kept_gallery("llcm", 1, 2, g_pids, g_cams), [False, True, True, True])
  np.testing.assert_array_equal(ranklist.kept_gallery("regdb", 1, 2, g_pids, g_cams), [True] * 4)


def _png_size(path):
  with Image.open(path) as im:
    im.load()  # decodes the whole file.
    assert im.format == "PNG"
    return im.size, np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_visualize_end_to_end_on_the_synthetic_run(tmp_path):
  shared, workdir = trained_workdir(), str(tmp_path / "run")
  shutil.copytree(shared, workdir)  # visualize writes <workdir>/visualize/: not into the shared run.
  source, emb = evaluator_embeddings()
  result = visualize.visualize(workdir, queries="0,3,5", compare_workdir=workdir)
  out = os.path.join(workdir, "visualize")
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  names = ("visible_to_infrared", "infrared_to_visible")
  assert set(summary["settings"]) == set(names)
  # Sizes: rank list = 11 columns x 1.2 in, 3 rows x 2.6 in; histograms = 2 runs x 5 in, 2 settings x 3.2 in;
  # t-SNE 7 x 7 in; all at 100 dpi.
  for name in names:
    size, pixels = _png_size(os.path.join(out, f"ranklist_{name}.png"))
    assert size == (1320, 780)
    entry = summary["settings"][name]
    q, g = source.test_sets[entry["query"]], source.test_sets[entry["gallery"]]
    # Reference: Euclidean distances of the L2-normalised evaluator embeddings, NumPy only.
    qn = emb[entry["query"]] / np.linalg.norm(emb[entry["query"]], axis=1, keepdims=True)
    gn = emb[entry["gallery"]] / np.linalg.norm(emb[entry["gallery"]], axis=1, keepdims=True)
    d = np.sqrt(np.maximum(0, ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)))
    # visualize embeds with the evaluator's own function and program (evaluator.embed_test_sets): the same float32
    # embeddings, so only the two float64 distance formulas differ.
    tol = float64_distance_bound(qn.shape[1])
    assert [r["position"] for r in entry["queries"]] == [0, 3, 5]
    colours = set()
    for r in entry["queries"]:
      i = r["position"]
      # the copy's image: the same file under the copy's synthetic_data/ as the shared run's.
      assert r["pid"] == q.labels[i] and os.path.relpath(r["path"], workdir) == os.path.relpath(q.paths[i], shared)
      top = [c["index"] for c in r["gallery"]]
      assert top == list(np.argsort(d[i], kind="stable")[:10])
      assert [c["pid"] for c in r["gallery"]] == list(g.labels[top])
      # The summary's distances are d's formula's twin on the same embeddings (float64_distance_bound).
      np.testing.assert_allclose([c["distance"] for c in r["gallery"]], d[i, top], rtol=0, atol=tol)
      colours |= {c["pid"] == r["pid"] for c in r["gallery"]}
    # Frames: pure-ish green pixels iff some shown match is correct, red iff some is wrong.
    green = ((pixels[..., 1] > 140) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)).sum()
    red = ((pixels[..., 0] > 190) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).sum()
    assert (green > 200) == (True in colours) and (red > 200) == (False in colours)
    same = q.labels[:, None] == g.labels[None, :]
    for run, s in entry["distances"].items():  # both columns: the same workdir.
      assert s["num_intra"] == same.sum() and s["num_inter"] == (~same).sum()
      assert s["intra_mean"] == pytest.approx(d[same].mean(), rel=0, abs=tol)  # means of distances within tol.
      assert s["inter_mean"] == pytest.approx(d[~same].mean(), rel=0, abs=tol)
      assert 0.0 <= s["overlap"] <= 1.0
    assert len(entry["distances"]) == 2
    assert _png_size(os.path.join(out, f"tsne_{name}.png"))[0] == (700, 700)
    assert entry["tsne"]["num_points"] == len(q) + len(g)  # 4 test ids < tsne_max_ids: every image.
  assert _png_size(os.path.join(out, "distances.png"))[0] == (1000, 640)
  assert result["files"]["distances"] == os.path.join(out, "distances.png")


def test_tsne_separates_two_far_clusters():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 0.01, (10, 8)) + np.eye(8)[0], rng.normal(0, 0.01, (10, 8)) + np.eye(8)[1]])
  c = tsne.embed_2d(x, 30.0, 0)
  within = max(np.ptp(c[:10], axis=0).max(), np.ptp(c[10:], axis=0).max())
  between = np.linalg.norm(c[:10].mean(0) - c[10:].mean(0))
  assert c.shape == (20, 2) and between > 2 * within
