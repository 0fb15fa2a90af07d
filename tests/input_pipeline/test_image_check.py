"""input_pipeline.image_check: the header check agrees with the decoder the pipeline uses, and sources apply it.

The reference is `tf.io.decode_image` (what `pipeline.decode` runs on every training image): for whole images and
for copies cut short at many lengths, the header check must call an image unreadable exactly when TensorFlow
cannot decode it. Files are written by Pillow.
"""

import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from fdnm_jax.errors import DataError
from input_pipeline import image_check, sources
from input_pipeline.datasets import regdb, synthetic

FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP"}


def _encoded(fmt, height=40, width=20, mode="RGB"):
  rng = np.random.default_rng(0)
  pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _decodes(data):
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
    return True
  except (tf.errors.InvalidArgumentError, tf.errors.OpError):
    return False


def _cuts(n):
  """Lengths to cut a file of n bytes to: inside the signature, the headers, the data, and just before its end."""
  return sorted({c for c in (1, 2, 3, 8, 12, 20, 30, 60, 100, 200, n // 3, n // 2, n - 100, n - 12, n - 2, n - 1)
                 if 0 < c < n})


@pytest.mark.parametrize("ext, mode", [("jpg", "RGB"), ("jpg", "L"), ("png", "RGB"), ("png", "L"), ("bmp", "RGB"),
                                       ("bmp", "L"), ("webp", "RGB")])
def test_header_check_agrees_with_tensorflow_on_whole_and_cut_images(tmp_path, ext, mode):
  data = _encoded(FORMATS[ext], mode=mode)
  variants = {"whole": data, **{f"cut{c}": data[:c] for c in _cuts(len(data))}}
  if ext in ("jpg", "png"):  # padding after the end marker, which some writers add, is not an error.
    variants["padded"] = data + b"\0" * 100
  disagreements = []
  for name, content in variants.items():
    path = tmp_path / f"{name}.{ext}"
    path.write_bytes(content)
    reason = image_check.check_file(str(path))
    if (reason is None) != _decodes(content):
      disagreements.append((name, reason))
  assert disagreements == []
  assert image_check.check_file(str(tmp_path / f"whole.{ext}")) is None


def test_empty_text_and_missing_files_are_named(tmp_path):
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "text.jpg").write_text("<html>404 not found</html>")
  assert image_check.check_file(str(tmp_path / "empty.jpg")) == "is empty (0 bytes)"
  assert image_check.check_file(str(tmp_path / "text.jpg")).startswith(
      "is not a JPEG, PNG, BMP, GIF or WebP image (it starts with b'<html>40'")
  assert image_check.check_file(str(tmp_path / "gone.jpg")) == "does not exist"


def test_check_files_counts_in_the_paths_order_with_threads(tmp_path):
  good = _encoded("JPEG")
  paths = []
  for i in range(100):  # more than one thread's chunk
    path = tmp_path / f"{i:03d}.jpg"
    path.write_bytes(good if i not in (7, 42) else good[: len(good) // 2])
    paths.append(str(path))
  summary = image_check.check_files(paths + paths[:3])  # a repeated path is checked once
  assert summary.num_checked == 100
  assert [c.path for c in summary.corrupt] == [paths[7], paths[42]]
  assert summary.describe().startswith("header check of 100 images in ") and "2 unreadable: Image " in \
      summary.describe()
  message = image_check.corrupt_message(summary.corrupt, "--config.data.skip_corrupt=true")
  assert message.startswith(f"2 images are unreadable: Image {paths[7]} is truncated")
  assert message.endswith("pass --config.data.skip_corrupt=true to leave them out (counted).")


def _damaged_source_config(tmp_path, skip):
  root = synthetic.generate(str(tmp_path / "RegDB"), num_train_ids=3, num_test_ids=2, images_per_id=2, num_cameras=1,
                            height=16, width=8, seed=0)
  sets = regdb.read_regdb(root, 1)
  bad_train, bad_test = sets["train_visible"].paths[1], sets["test_thermal"].paths[0]
  open(bad_train, "wb").close()
  with open(bad_test, "r+b") as f:
    f.truncate(30)
  config = ml_collections.ConfigDict({"dataset": "regdb", "data": {"root": root, "trial": 1, "skip_corrupt": skip}})
  return config, sets, bad_train, bad_test


def test_a_source_read_from_folders_stops_at_an_unreadable_image(tmp_path):
  config, _, bad_train, bad_test = _damaged_source_config(tmp_path, skip=False)
  with pytest.raises(DataError) as e:
    sources.load_source(config, str(tmp_path))
  assert f"Image {bad_train} is empty (0 bytes)" in str(e.value) and bad_test in str(e.value)
  assert "--config.data.skip_corrupt=true" in str(e.value)


def test_skip_corrupt_leaves_them_out_and_logs_the_count(tmp_path, caplog):
  config, sets, bad_train, bad_test = _damaged_source_config(tmp_path, skip=True)
  with caplog.at_level("WARNING", logger=sources.__name__):
    source = sources.load_source(config, str(tmp_path))
  assert source.train_visible.paths == tuple(p for p in sets["train_visible"].paths if p != bad_train)
  assert source.test_sets["infrared"].paths == tuple(p for p in sets["test_thermal"].paths if p != bad_test)
  kept = [i for i, p in enumerate(sets["train_visible"].paths) if p != bad_train]
  assert source.train_visible.labels.tolist() == sets["train_visible"].labels[kept].tolist()
  total = sum(len(s) for s in sets.values())
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert f"header check of {total} regdb images" in warning and "2 unreadable" in warning
  assert "left out (config.data.skip_corrupt)" in warning
