"""Train and eval streams: contents against PIL-decoded references, determinism, resume, process slicing."""

import itertools

import numpy as np
import pytest
from PIL import Image

from input_pipeline import pipeline
from input_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from input_pipeline.datasets.image_set import ImageSet
from input_pipeline.sampling import CrossModalitySampler
from tests.input_pipeline.test_augment import normalised_bound
from tests.rounding import U


def _take(stream, n):
  return list(itertools.islice(stream, n))


# The pipeline's float32 (x / 255 - mean) / std of 0..255 pixels: /255 errs by <= 2u (a product with the rounded
# reciprocal, if the tf.data graph divides so), then the normalisation's own worst case (`normalised_bound`): ~21u;
# 1.5x that, ~1.9e-6.
NORMALISED_TOL = 1.5 * normalised_bound(2 * U)


def _reference(path: str) -> np.ndarray:
  """The eval image of a file stored at the input size: PIL decode, /255, ImageNet normalisation."""
  with Image.open(path) as im:
    x = np.asarray(im.convert("RGB"), np.float64) / 255.0
  return (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def _no_augmentation(c):
  c.pad, c.flip, c.random_grayscale, c.random_erasing, c.channel_aug = 0, False, 0.0, 0.0, False
  return c


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_label_map_is_the_sorted_union():
  vis = ImageSet(paths=("a", "b", "c"), labels=[30, 10, 30], cameras=[1, 1, 1], modality=0)
  ir = ImageSet(paths=("d", "e"), labels=[20, 10], cameras=[2, 2], modality=1)
  assert pipeline.train_label_map(vis, ir) == {10: 0, 20: 1, 30: 2}
  assert pipeline.num_classes(vis, ir) == 3


def test_train_batch_contents(tiny_sets, input_config):
  vis, ir = tiny_sets["train_visible"], tiny_sets["train_thermal"]
  c = _no_augmentation(input_config)
  batches = _take(pipeline.train_batches(vis, ir, c, seed=3, start_step=5), 2)
  sampler = CrossModalitySampler(vis.labels, ir.labels, c.num_ids_per_batch, c.num_instances, seed=3)
  classes = {p: i for i, p in enumerate(sorted(set(vis.labels.tolist())))}
  for step, batch in zip((5, 6), batches):
    assert batch["step"] == step
    assert batch["visible"].shape == batch["infrared"].shape == (8, 32, 16, 3)
    assert batch["visible"].dtype == np.float32 and batch["visible_labels"].dtype == np.int32
    v_idx, i_idx = sampler.batch_indices(step)
    np.testing.assert_array_equal(batch["visible_labels"], [classes[int(p)] for p in vis.labels[v_idx]])
    np.testing.assert_array_equal(batch["infrared_labels"], [classes[int(p)] for p in ir.labels[i_idx]])
    np.testing.assert_array_equal(batch["visible_labels"], batch["infrared_labels"])
    for j in (0, 7):
      np.testing.assert_allclose(batch["visible"][j], _reference(vis.paths[v_idx[j]]), rtol=0, atol=NORMALISED_TOL)
      np.testing.assert_allclose(batch["infrared"][j], _reference(ir.paths[i_idx[j]]), rtol=0, atol=NORMALISED_TOL)


def test_train_stream_is_deterministic_and_resumable(tiny_sets, input_config):
  vis, ir = tiny_sets["train_visible"], tiny_sets["train_thermal"]
  full = _take(pipeline.train_batches(vis, ir, input_config, seed=1), 4)
  again = _take(pipeline.train_batches(vis, ir, input_config, seed=1), 4)
  resumed = _take(pipeline.train_batches(vis, ir, input_config, seed=1, start_step=2), 2)
  for a, b in zip(full, again):
    _assert_batches_equal(a, b)
  for a, b in zip(full[2:], resumed):
    _assert_batches_equal(a, b)
  assert not np.array_equal(full[0]["visible"], full[1]["visible"])
  other = _take(pipeline.train_batches(vis, ir, input_config, seed=2), 1)[0]
  assert not np.array_equal(full[0]["visible"], other["visible"])


def test_train_process_slices_concatenate_to_the_global_batch(tiny_sets, input_config):
  vis, ir = tiny_sets["train_visible"], tiny_sets["train_thermal"]
  whole = _take(pipeline.train_batches(vis, ir, input_config, seed=0, start_step=3), 2)
  parts = [_take(pipeline.train_batches(vis, ir, input_config, seed=0, start_step=3, process_index=p,
                                        process_count=2), 2) for p in range(2)]
  for step in range(2):
    for key in ("visible", "infrared", "visible_labels", "infrared_labels"):
      assert parts[0][step][key].shape[0] == 4
      np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    pipeline.train_batches(vis, ir, input_config, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.train_batches(vis, ir, input_config, seed=0, process_index=2, process_count=2)


def test_eval_stream_order_padding_and_flip(tiny_sets, input_config):
  s = tiny_sets["test_visible"]
  assert len(s) == 16
  batches = list(pipeline.eval_batches(s, input_config, 6, flip=True))
  assert len(batches) == 3
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index, list(range(16)) + [-1, -1])
  np.testing.assert_array_equal(mask, index >= 0)
  assert index.dtype == np.int32 and mask.dtype == bool
  images = np.concatenate([b["images"] for b in batches])
  assert images.shape == (18, 32, 16, 3) and images.dtype == np.float32
  for i in (0, 9, 15):
    np.testing.assert_allclose(images[i], _reference(s.paths[i]), rtol=0, atol=NORMALISED_TOL)
  np.testing.assert_array_equal(images[16:], 0.0)
  flipped = np.concatenate([b["images_flipped"] for b in batches])
  np.testing.assert_array_equal(flipped, images[:, :, ::-1])


def test_eval_process_slices(tiny_sets, input_config):
  s = tiny_sets["test_thermal"]
  whole = list(pipeline.eval_batches(s, input_config, 6))
  parts = [list(pipeline.eval_batches(s, input_config, 6, process_index=p, process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 3
  for j, batch in enumerate(whole):
    for key in batch:
      assert parts[0][j][key].shape[0] == 3
      np.testing.assert_array_equal(np.concatenate([parts[0][j][key], parts[1][j][key]]), batch[key])
  with pytest.raises(ValueError, match="multiple of the process count"):
    pipeline.eval_batches(s, input_config, 6, process_index=0, process_count=4)


def test_unreadable_images_are_named(tiny_sets, input_config, tmp_path):
  bad = tmp_path / "broken.bmp"
  bad.write_bytes(b"this is not an image")
  vis, ir = tiny_sets["train_visible"], tiny_sets["train_thermal"]
  first = [int(np.flatnonzero(vis.labels == p)[0]) for p in np.unique(vis.labels)[:4]]
  # four identities, one image each: every batch of P = 4 holds every image, the broken one included
  paths = [vis.paths[i] for i in first]
  paths[2] = str(bad)
  broken = ImageSet(paths=tuple(paths), labels=vis.labels[first], cameras=vis.cameras[first], modality=0)
  ir_first = [int(np.flatnonzero(ir.labels == p)[0]) for p in np.unique(vis.labels)[:4]]
  infrared = ImageSet(paths=tuple(ir.paths[i] for i in ir_first), labels=ir.labels[ir_first],
                      cameras=ir.cameras[ir_first], modality=1)
  with pytest.raises(pipeline.ImageDecodeError, match="broken.bmp"):
    next(pipeline.train_batches(broken, infrared, input_config, seed=0))
  with pytest.raises(pipeline.ImageDecodeError, match="broken.bmp"):
    list(pipeline.eval_batches(broken, input_config, 4))
  missing = ImageSet(paths=(str(tmp_path / "gone.bmp"),), labels=[0], cameras=[1], modality=0)
  with pytest.raises(FileNotFoundError, match="gone.bmp"):
    list(pipeline.eval_batches(missing, input_config, 4))
