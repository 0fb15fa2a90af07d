"""The synthetic generator: determinism, idempotence, RegDB layout, and a real modality gap."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline.datasets import synthetic
SMALL = dict(num_train_ids=3, num_test_ids=2, images_per_id=2, num_cameras=2, height=32, width=16, seed=0)


def _tree_bytes(root: str) -> dict[str, bytes]:
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _list(root: str, name: str) -> list[tuple[str, int]]:
  with open(os.path.join(root, "idx", name), encoding="utf-8") as f:
    return [(line.split()[0], int(line.split()[1])) for line in f if line.strip()]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
  a = _tree_bytes(synthetic.generate(str(tmp_path / "a"), **SMALL))
  b = _tree_bytes(synthetic.generate(str(tmp_path / "b"), **SMALL))
  c = _tree_bytes(synthetic.generate(str(tmp_path / "c"), **dict(SMALL, seed=1)))
  assert a == b
  images = [k for k in a if k.endswith(".bmp")]
  assert len(images) == 5 * 2 * 2
  assert all(a[k] != c[k] for k in images)


def test_a_pool_of_processes_writes_the_same_bytes_as_one_process(tmp_path):
  serial = _tree_bytes(synthetic.generate(str(tmp_path / "serial"), **SMALL, workers=1))
  pooled = _tree_bytes(synthetic.generate(str(tmp_path / "pooled"), **SMALL, workers=2))
  assert pooled == serial  # every image, list file and the manifest.
  # The pool's files are the renderer's images (not merely the same as another run of the same writer).
  image = np.asarray(Image.open(tmp_path / "pooled" / "Thermal" / "4" / "c4_0001.bmp").convert("RGB"))
  np.testing.assert_array_equal(image, synthetic.render_image(0, 4, 1, 1, 2, 32, 16))


def test_matching_manifest_is_reused_and_mismatch_regenerates(tmp_path):
  root = str(tmp_path / "set")
  synthetic.generate(root, **SMALL)
  probe = os.path.join(root, "Visible", "1", "c1_0000.bmp")
  before = os.stat(probe).st_mtime_ns
  os.utime(probe, ns=(before - 10**9, before - 10**9))
  assert synthetic.generate(root, **SMALL) == os.path.abspath(root)
  assert os.stat(probe).st_mtime_ns == before - 10**9  # untouched: not regenerated

  synthetic.generate(root, **dict(SMALL, seed=5))
  with open(os.path.join(root, synthetic.MANIFEST)) as f:
    assert json.load(f)["seed"] == 5
  assert _tree_bytes(root) == _tree_bytes(synthetic.generate(str(tmp_path / "fresh"), **dict(SMALL, seed=5)))
  assert sorted(os.listdir(tmp_path)) == ["fresh", "set"]  # no temporary folders left behind


def test_refuses_a_foreign_non_empty_folder(tmp_path):
  (tmp_path / "mine.txt").write_text("user data")
  with pytest.raises(FileExistsError, match="not a generated synthetic set"):
    synthetic.generate(str(tmp_path), **SMALL)
  assert (tmp_path / "mine.txt").read_text() == "user data"


def test_rejects_bad_parameters(tmp_path):
  with pytest.raises(ValueError, match="num_cameras"):
    synthetic.generate(str(tmp_path / "x"), **dict(SMALL, num_cameras=0))
  with pytest.raises(TypeError, match="height"):
    synthetic.generate(str(tmp_path / "x"), **dict(SMALL, height=32.0))


def test_layout_is_regdb(tiny_root, tiny_params):
  keys = ("num_train_ids", "num_test_ids", "images_per_id", "num_cameras")
  n_train, n_test, n_img, n_cam = (tiny_params[k] for k in keys)
  pids = set(range(1, n_train + n_test + 1))
  assert set(os.listdir(os.path.join(tiny_root, "Visible"))) == {str(p) for p in pids}
  assert set(os.listdir(os.path.join(tiny_root, "Thermal"))) == {str(p) for p in pids}
  expected_lists = {f"{part}_{kind}_{t}.txt" for part in ("train", "test") for kind in ("visible", "thermal")
                    for t in range(1, 11)}
  assert set(os.listdir(os.path.join(tiny_root, "idx"))) == expected_lists
  partitions = set()
  for t in range(1, 11):
    ids = {}
    for part, n_ids in (("train", n_train), ("test", n_test)):
      for kind, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        lines = _list(tiny_root, f"{part}_{kind}_{t}.txt")
        assert len(lines) == n_ids * n_img
        pid_of = [int(rel.split("/")[1]) for rel, _ in lines]
        for rel, _ in lines:
          assert rel.startswith(folder + "/") and rel.endswith(".bmp")
          assert os.path.isfile(os.path.join(tiny_root, rel))
        # labels: the file's identities relabelled 0..N-1 in ascending pid order
        order = sorted(set(pid_of))
        assert [label for _, label in lines] == [order.index(p) for p in pid_of]
        assert pid_of == sorted(pid_of)
        ids[(part, kind)] = frozenset(pid_of)
      assert ids[(part, "visible")] == ids[(part, "thermal")]
    assert not ids[("train", "visible")] & ids[("test", "visible")]
    assert ids[("train", "visible")] | ids[("test", "visible")] == pids
    partitions.add(ids[("train", "visible")])
  assert len(partitions) > 1  # the splits differ
  # camera in the file name: visible 1..C, thermal C+1..2C, image i from camera i % C
  visible = sorted(os.listdir(os.path.join(tiny_root, "Visible", "1")))
  thermal = sorted(os.listdir(os.path.join(tiny_root, "Thermal", "1")))
  assert visible == sorted(f"c{1 + i % n_cam}_{i:04d}.bmp" for i in range(n_img))
  assert thermal == sorted(f"c{n_cam + 1 + i % n_cam}_{i:04d}.bmp" for i in range(n_img))


def test_bmp_files_decode_to_the_rendered_images(tiny_root, tiny_params):
  p = tiny_params
  for modality, folder, camera in ((0, "Visible", 2), (1, "Thermal", 4)):  # image 1: camera 1 + 1 % 2, then + 2
    path = os.path.join(tiny_root, folder, "3", f"c{camera}_0001.bmp")
    with Image.open(path) as im:
      assert im.format == "BMP" and im.mode == "RGB" and im.size == (p["width"], p["height"])
      pixels = np.asarray(im)
    expected = synthetic.render_image(p["seed"], 3, modality, 1, p["num_cameras"], p["height"], p["width"])
    np.testing.assert_array_equal(pixels, expected)


def _images(modality: int, pids, n=4, h=64, w=32) -> np.ndarray:
  return np.stack([synthetic.render_image(0, p, modality, i, 2, h, w) for p in pids for i in range(n)])


def test_modality_gap_is_real():
  pids = range(1, 13)
  vis = _images(0, pids).astype(np.float64) / 255.0
  ir = _images(1, pids).astype(np.float64) / 255.0
  # infrared: one intensity replicated to three channels; visible: coloured. The visible renderer's i.i.d. noise
  # alone (sd <= 0.03 per channel) gives a mean channel range of 1.69 sd <= 0.051 (the mean range of 3 normal
  # draws); above 0.1 the colour is the rendering's.
  assert np.array_equal(ir[..., 0], ir[..., 1]) and np.array_equal(ir[..., 0], ir[..., 2])
  assert np.mean(vis.max(-1) - vis.min(-1)) > 0.1
  # per-channel statistics differ between modalities: per identity, the difference of its visible and infrared mean
  # colour; over the 12 identities, the mean difference of some channel is > 5 standard errors from 0 (with no
  # difference, P(|t| > 5) = 4e-4 for Student's t with 11 degrees of freedom, 1.2e-3 for the largest of 3 channels).
  diff = (vis.mean(axis=(1, 2)) - ir.mean(axis=(1, 2))).reshape(len(pids), -1, 3).mean(axis=1)  # [identity, channel]
  standard_error = diff.std(axis=0, ddof=1) / np.sqrt(len(pids))
  assert np.max(np.abs(diff.mean(axis=0)) / standard_error) > 5
  # spectrum: infrared keeps far less of its energy at high spatial frequencies (above a quarter of the
  # sampling rate on either axis) than visible does.
  def high_frequency_share(x):
    g = x.mean(-1)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.abs(np.fft.fftfreq(g.shape[1]))[:, None]
    fx = np.abs(np.fft.fftfreq(g.shape[2]))[None, :]
    return power[:, np.maximum(fy, fx) > 0.25].sum() / power.sum()
  # The infrared blur (5-tap binomial, response cos^4(pi f) per axis) keeps <= cos^8(pi / 4) = 1/16 of the power at
  # max(fy, fx) > 1/4; 1/4 leaves 4x for the sensor noise and banding added after the blur.
  assert high_frequency_share(ir) < 0.25 * high_frequency_share(vis)


@pytest.mark.parametrize("modality", [0, 1])
def test_images_carry_identity_within_a_modality(modality):
  pids, n = range(1, 13), 4
  x = _images(modality, pids, n=n).astype(np.float64).mean(-1).reshape(len(pids) * n, -1)
  x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  sim = x @ x.T
  np.fill_diagonal(sim, -np.inf)
  labels = np.repeat(np.arange(len(pids)), n)
  rank1 = np.mean(labels[sim.argmax(1)] == labels)
  # Nearest neighbour on raw pixels, well above chance: 3 of the 47 other images share the identity, p = 0.064,
  # sd sqrt(p (1 - p) / 48) = 0.035 over the 48 queries; 0.25 is 5.3 sd above chance.
  assert rank1 > 3.0 / len(pids)
