"""Augmentation ops against NumPy references and their defining properties."""

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import augment

H, W = 12, 8
RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(0.0, 1.0, size=(H, W, 3)).astype(np.float32)


def _seed(i: int) -> tf.Tensor:
  return tf.constant([17, i], tf.int64)


def test_constants_are_imagenet():
  assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert augment.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_normalize():
  expected = (IMAGE - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(augment.normalize(tf.constant(IMAGE)).numpy(), expected, rtol=1e-6, atol=1e-6)


def _bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Half-pixel-centre bilinear resize, edges clamped (no antialiasing)."""
  def axis_weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo
  r0, r1, fr = axis_weights(x.shape[0], out_h)
  c0, c1, fc = axis_weights(x.shape[1], out_w)
  rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


@pytest.mark.parametrize("size", [(24, 16), (5, 3), (H, W)])
def test_resize_matches_bilinear_reference(size):
  out = augment.resize(tf.constant(IMAGE), *size).numpy()
  np.testing.assert_allclose(out, _bilinear_reference(IMAGE.astype(np.float64), *size), atol=1e-5)
  if size == (H, W):
    np.testing.assert_array_equal(out, IMAGE)


def test_grayscale_formula_and_probability():
  expected = IMAGE @ np.array([0.299, 0.587, 0.114])
  always = augment.random_grayscale(tf.constant(IMAGE), 1.0, _seed(0)).numpy()
  for ch in range(3):
    np.testing.assert_allclose(always[..., ch], expected, atol=1e-6)
  np.testing.assert_array_equal(augment.random_grayscale(tf.constant(IMAGE), 0.0, _seed(0)).numpy(), IMAGE)
  gray = [np.allclose(augment.random_grayscale(tf.constant(IMAGE), 0.5, _seed(i)).numpy()[..., 0], expected)
          for i in range(40)]
  assert 5 < sum(gray) < 35


def test_flip_mirrors_or_keeps():
  outcomes = []
  for i in range(30):
    out = augment.random_flip(tf.constant(IMAGE), _seed(i)).numpy()
    if np.array_equal(out, IMAGE):
      outcomes.append("same")
    else:
      np.testing.assert_array_equal(out, IMAGE[:, ::-1])
      outcomes.append("mirrored")
  assert set(outcomes) == {"same", "mirrored"}


def test_pad_and_crop_keeps_content():
  pad = 3
  padded = np.pad(IMAGE, ((pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for i in range(40):
    out = augment.pad_and_random_crop(tf.constant(IMAGE), pad, _seed(i)).numpy()
    assert out.shape == IMAGE.shape
    match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
             if np.array_equal(out, padded[dy:dy + H, dx:dx + W])]
    assert match, "the crop is not a window of the zero-padded image"
    offsets.add(match[0])
  assert len(offsets) > 5
  np.testing.assert_array_equal(augment.pad_and_random_crop(tf.constant(IMAGE), 0, _seed(0)).numpy(), IMAGE)


def test_random_erasing_rectangle_area_and_fill():
  height, width, lo, hi, r1 = 32, 16, 0.02, 0.4, 0.3
  image = np.full((height, width, 3), -5.0, np.float32)
  area = height * width
  for i in range(30):
    out = augment.random_erasing(tf.constant(image), 1.0, (lo, hi), r1, _seed(i)).numpy()
    erased = (out != -5.0).all(-1)
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    assert rows.size and cols.size
    h, w = rows.size, cols.size
    assert erased.sum() == h * w and erased[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one rectangle
    np.testing.assert_allclose(out[erased], np.broadcast_to(augment.IMAGENET_MEAN, (h * w, 3)), atol=0)
    assert h < height and w < width
    # h, w are rounded from sqrt(target * aspect), sqrt(target / aspect): |h*w - target| <= (h + w + 1) / 2 + 1/4
    slack = (h + w + 1) / 2 + 0.25
    assert lo * area - slack <= h * w <= hi * area + slack
    assert r1 * (w - 0.5) - 0.5 <= h <= (w + 0.5) / r1 + 0.5
  np.testing.assert_array_equal(augment.random_erasing(tf.constant(image), 0.0, (lo, hi), r1, _seed(0)).numpy(),
                                image)


def test_random_erasing_gives_up_when_nothing_fits():
  image = np.zeros((32, 16, 3), np.float32)
  out = augment.random_erasing(tf.constant(image), 1.0, (0.99, 0.999), 1.0, _seed(0)).numpy()
  np.testing.assert_array_equal(out, image)  # a 22 x 22 square never fits in width 16


def test_channel_augmentation():
  counts = {0: 0, 1: 0, 2: 0, "kept": 0}
  n = 200
  for i in range(n):
    out = augment.channel_augmentation(tf.constant(IMAGE), _seed(i)).numpy()
    if np.array_equal(out, IMAGE):
      counts["kept"] += 1
      continue
    channel = [c for c in range(3) if all(np.array_equal(out[..., k], IMAGE[..., c]) for k in range(3))]
    assert len(channel) == 1
    counts[channel[0]] += 1
  assert all(0.13 * n < v < 0.37 * n for v in counts.values()), counts


def test_train_transform(input_config):
  image = tf.constant((IMAGE * 255).astype(np.uint8))
  input_config.height, input_config.width = 24, 16
  a = augment.train_transform(image, _seed(1), input_config).numpy()
  b = augment.train_transform(image, _seed(1), input_config).numpy()
  c = augment.train_transform(image, _seed(2), input_config).numpy()
  assert a.shape == (24, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # every op off: exactly the eval transform
  input_config.pad, input_config.flip, input_config.random_grayscale = 0, False, 0.0
  input_config.random_erasing, input_config.channel_aug = 0.0, False
  plain = augment.train_transform(image, _seed(1), input_config).numpy()
  np.testing.assert_array_equal(plain, augment.eval_transform(image, 24, 16).numpy())
  expected = ((_bilinear_reference(np.asarray(image, np.float64) / 255.0, 24, 16) - np.array(augment.IMAGENET_MEAN))
              / np.array(augment.IMAGENET_STD))
  np.testing.assert_allclose(plain, expected, atol=1e-4)
