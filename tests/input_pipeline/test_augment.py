"""Augmentation ops against NumPy references and their defining properties; the resize against Pillow."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import default
from fdnm_jax import run_config
from fdnm_jax.errors import ConfigError
from input_pipeline import augment, pipeline
from tests.rounding import U

H, W = 12, 8
RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(0.0, 1.0, size=(H, W, 3)).astype(np.float32)


def normalised_bound(pixel_error: float) -> float:
  """Worst-case float32 error of `normalize` (z = (x - mean) / std, x in [0, 1], |z| <= 2.64) of an x already
  `pixel_error` off ([0, 1] units): the float32 mean and the subtraction add <= u (mean + |x - mean| <= 1), divided by
  the smallest std (0.224); the float32 std and the division add 2u |z| (3u |z| if the division is a product with the
  rounded reciprocal)."""
  return (pixel_error + U) / min(augment.IMAGENET_STD) + 3 * U * 2.64


# float32 gray = 0.299 R + 0.587 G + 0.114 B of values in [0, 1): the rounded weights and the products (2u per term)
# and the two additions (2u) of terms summing to <= 1: <= 4u ~ 2.4e-7. 1e-6 keeps 4x over it (gaps of a third of
# the worst case occur). An ungrayed channel differs from the gray value by up to ~0.5.
GRAY_TOL = 1e-6


def _seed(i: int) -> tf.Tensor:
  return tf.constant([17, i], tf.int64)


def test_constants_are_imagenet():
  assert augment.IMAGENET_MEAN == (0.485, 0.456, 0.406)
  assert augment.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_normalize():
  expected = (IMAGE - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  # Worst case 4.5u + 2u |z| <= 10u ~ 6e-7 (normalised_bound(0) = 12u with a reciprocal). The tolerance,
  # 1e-6 + 1e-6 |z| (17u..61u), keeps >= 3.7x over it: gaps of half the worst case occur, too close to the bound itself.
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


# TensorFlow's bilinear resize in float32 of values in [0, 1]: the source position (i + 0.5) * fl(n_in / n_out) - 0.5
# rounds the scale, the product and the subtraction, <= 3u x (i + 0.5) scale: <= 32u for the rows of 12 -> 5 (up to
# 10.8), <= 20u for the columns of 8 -> 3 (up to 6.7), exact at 2x upscaling; times neighbour differences <= 1. The
# lerps a + (b - a) t round 3 times each: <= 3u per axis, 6u. <= 58u in all:
BILINEAR_TOL = 64 * U  # ~3.8e-6


@pytest.mark.parametrize("size", [(24, 16), (5, 3), (H, W)])
def test_tf_bilinear_resize_matches_bilinear_reference(size):
  out = augment.resize(tf.constant(IMAGE), *size, "tf_bilinear").numpy()
  np.testing.assert_allclose(out, _bilinear_reference(IMAGE.astype(np.float64), *size), rtol=0, atol=BILINEAR_TOL)
  if size == (H, W):
    np.testing.assert_array_equal(out, IMAGE)


# --- The PIL resize against Pillow itself ---------------------------------------------------------------------------
PIL_FILTERS = {"pil_lanczos": Image.Resampling.LANCZOS, "pil_bicubic": Image.Resampling.BICUBIC,
               "pil_bilinear": Image.Resampling.BILINEAR}
# Pillow computes each pass with 22-bit fixed-point weights and rounds it to uint8; ours is float32 and not rounded.
# One pass: |ours - PIL| <= 1/2 (PIL's rounding) + the fixed-point and float32 error (<= 23 taps x 255 x 2^-23
# + float32 accumulation, under 2e-3 for the sizes here).
ONE_PASS = 0.5 + 2e-3


def two_pass_bound(stored_height: int, height: int, method: str) -> float:
  """|ours - PIL| bound of a resize of both axes: PIL also rounds (and clips, 1-Lipschitz) its horizontal pass,
  an error <= ONE_PASS per pixel that the vertical weights carry times their largest absolute row sum (1 for the
  non-negative bilinear weights, up to about 1.6 for the lobed filters), then rounds the output (ONE_PASS). The
  weights are the ones the one-axis test checks against Pillow."""
  row_sum = float(np.abs(augment.pil_resize_weights(stored_height, height, method).numpy()).sum(axis=1).max())
  return ONE_PASS * (1.0 + row_sum)


def _crop_like(height: int, width: int, seed: int) -> np.ndarray:
  """uint8 [height, width, 3] with the content of a person crop: a smooth background gradient, a darker body with
  sharp edges, striped clothing texture at a few pixels' period, and sensor noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
  image = 90 + 80 * y[..., None] * np.array([1.0, 0.8, 0.6]) + 30 * x[..., None]
  body = (np.abs(x - 0.5) < 0.22 + 0.05 * np.sin(9 * y)) & (y > 0.12) & (y < 0.95)
  stripes = 40 * np.sign(np.sin(2 * np.pi * y * height / rng.uniform(3, 6)))
  image[body] = np.array([60.0, 50.0, 120.0]) + stripes[body][:, None]
  head = (x - 0.5) ** 2 / 0.02 + (y - 0.08) ** 2 / 0.004 < 1
  image[head] = (200, 160, 130)
  image += rng.normal(0, 8, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _encoded(image: np.ndarray, kind: str) -> bytes:
  buf = io.BytesIO()
  if kind == "jpeg":
    Image.fromarray(image).save(buf, "JPEG", quality=90)
  else:
    Image.fromarray(image).save(buf, "BMP")
  return buf.getvalue()


def _pil_resize(pixels: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  """Pillow's `Image.resize` of uint8 [h, w, 3] to (height, width), as float64."""
  return np.asarray(Image.fromarray(pixels).resize((width, height), PIL_FILTERS[method]), np.float64)


def _pil_resize_horizontal_first(pixels: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  """Pillow's two passes in the references' order: a width-only resize, then a height-only one (each one pass).

  The Pillow the references ran (< 10: it still had Image.ANTIALIAS) always resampled horizontally first, and
  these two calls are exactly its two passes (its horizontal pass computes only the rows the vertical one reads:
  the same values). The installed Pillow 13 runs the vertical pass first when the height shrinks and
  2 (width_out - width_in) > height_out - height_in; for the lobed filters that order changes the pixels where
  the first pass overshoots 0..255 and is clipped (by tens of grey levels on sharp edges).
  """
  image = Image.fromarray(pixels)
  if image.width != width:
    image = image.resize((width, image.height), PIL_FILTERS[method])
  if image.height != height:
    image = image.resize((width, height), PIL_FILTERS[method])
  return np.asarray(image, np.float64)


def _pillow_goes_horizontal_first(stored: tuple[int, int], height: int, width: int) -> bool:
  """Whether the installed Pillow's one `resize` call also runs the horizontal pass first (docstring above)."""
  return not (height < stored[0] and 2 * (width - stored[1]) > height - stored[0])


# (stored size) -> (network input): RegDB's 128 x 64 up to 384 x 144, SYSU/LLCM-like crops down, odd sizes both
# ways; the last two shrink the height and widen the image (the installed Pillow runs those vertically first).
SIZES = [((128, 64), (384, 144)), ((500, 211), (384, 144)), ((301, 117), (384, 144)), ((37, 23), (288, 144)),
         ((433, 97), (288, 144)), ((421, 131), (384, 144))]


@pytest.mark.parametrize("kind", ["jpeg", "bmp"])
@pytest.mark.parametrize("method", list(PIL_FILTERS))
def test_pil_resize_matches_pillow_on_encoded_crops(method, kind):
  for i, (stored, (height, width)) in enumerate(SIZES):
    data = _encoded(_crop_like(*stored, seed=i), kind)
    decoded = pipeline.decode_bytes(tf.constant(data)).numpy()
    # The pipeline's decoder gives PIL's own pixels (JPEG: the accurate IDCT PIL uses; BMP is lossless).
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    ours = augment.resize(tf.constant(decoded), height, width, method).numpy()
    assert ours.shape == (height, width, 3) and ours.dtype == np.float32
    bound = two_pass_bound(stored[0], height, method)
    gap = np.abs(ours - _pil_resize_horizontal_first(decoded, height, width, method))
    assert gap.max() <= bound, (method, kind, stored, gap.max(), bound)
    if _pillow_goes_horizontal_first(stored, height, width):
      gap = np.abs(ours - _pil_resize(decoded, height, width, method))
      assert gap.max() <= bound, (method, kind, stored, gap.max(), bound)


@pytest.mark.parametrize("method", list(PIL_FILTERS))
def test_pil_resize_one_axis_is_within_pillows_rounding(method):
  """A resize of one axis is one pass: only Pillow's final rounding separates us."""
  image = _crop_like(301, 117, seed=7)
  for height, width in ((301, 144), (301, 50), (384, 117), (96, 117)):
    gap = np.abs(augment.resize(tf.constant(image), height, width, method).numpy()
                 - _pil_resize(image, height, width, method))
    assert gap.max() <= ONE_PASS, (method, height, width, gap.max())


def test_the_filters_and_the_unantialiased_resize_are_told_apart():
  """The tolerances above separate the filters: each differs from the others' Pillow output by more than them."""
  image = _crop_like(500, 211, seed=3)
  lanczos = _pil_resize(image, 384, 144, "pil_lanczos")
  for method in ("pil_bilinear", "pil_bicubic", "tf_bilinear"):
    gap = np.abs(augment.resize(tf.constant(image), 384, 144, method).numpy() - lanczos).max()
    assert gap > 2 * two_pass_bound(500, 384, "pil_lanczos"), (method, gap)


def test_pil_resize_of_the_same_size_and_on_unknown_shapes():
  image = _crop_like(40, 20, seed=1)
  np.testing.assert_array_equal(augment.resize(tf.constant(image), 40, 20).numpy(), image)
  # Inside tf.data the image shape is unknown until run time: the same numbers.
  fn = tf.function(lambda x: augment.resize(x, 64, 32), input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  # The same weights (bit-identical in a graph and eagerly, as the precomputed-weights test below checks) in the same
  # matrix product kernels with the same run-time shapes: the same floats.
  np.testing.assert_array_equal(fn(tf.constant(image)).numpy(), augment.resize(tf.constant(image), 64, 32).numpy())
  assert fn(tf.constant(image[:30])).numpy().shape == (64, 32, 3)


@pytest.mark.parametrize("method", ["pil_lanczos", "pil_bicubic", "pil_bilinear", "tf_bilinear"])
def test_precomputed_resize_weights_give_the_same_pixels_for_listed_and_other_sizes(method):
  """`ResizeWeights` only moves the weights' computation out of the per-image graph: inside tf.data (unknown
  shapes), an image of a listed size and one of another size come out bit-identical to the plain resize."""
  weights = augment.ResizeWeights([96], [48], 64, 32, method)
  spec = [tf.TensorSpec([None, None, 3], tf.uint8)]
  plain = tf.function(lambda x: augment.resize(x, 64, 32, method), input_signature=spec)
  hinted = tf.function(lambda x: augment.resize(x, 64, 32, method, weights), input_signature=spec)
  for size in ((96, 48), (96, 40), (80, 48), (120, 60)):
    image = tf.constant(_crop_like(*size, seed=sum(size)))
    np.testing.assert_array_equal(hinted(image).numpy(), plain(image).numpy(), err_msg=str(size))
  if method != "tf_bilinear":
    graph_weights = tf.function(lambda n: augment.pil_resize_weights(n, 32, method),
                                input_signature=[tf.TensorSpec([], tf.int32)])
    np.testing.assert_array_equal(weights.cols[48].numpy(), graph_weights(tf.constant(48)).numpy())
  with pytest.raises(ValueError, match="weights for 64x32"):
    augment.resize(tf.constant(IMAGE), 32, 16, method, weights)


def test_unknown_resize_method_names_the_field():
  with pytest.raises(ConfigError, match=r"config.input.resize='area'.*pil_lanczos"):
    augment.resize(tf.constant(IMAGE), 4, 4, "area")


def test_grayscale_formula_and_probability():
  expected = IMAGE @ np.array([0.299, 0.587, 0.114])
  always = augment.random_grayscale(tf.constant(IMAGE), 1.0, _seed(0)).numpy()
  for ch in range(3):
    np.testing.assert_allclose(always[..., ch], expected, rtol=0, atol=GRAY_TOL)
  np.testing.assert_array_equal(augment.random_grayscale(tf.constant(IMAGE), 0.0, _seed(0)).numpy(), IMAGE)
  gray = [np.allclose(augment.random_grayscale(tf.constant(IMAGE), 0.5, _seed(i)).numpy()[..., 0], expected, rtol=0,
                      atol=GRAY_TOL) for i in range(40)]
  # Binomial(40, 0.5): mean 20, sd sqrt(40 * 0.5 * 0.5) = 3.2; 6..34 is +-4.4 sd, P(outside) = 1.4e-6.
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
  # Each outcome Binomial(200, 1/4): mean 50, sd sqrt(200 * 1/4 * 3/4) = 6.1; 27..73 is +-3.8 sd,
  # P(any of the four outside) <= 5.4e-4.
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
  # the default resize is PIL's LANCZOS (Image.ANTIALIAS): within the two-pass bound, in [0, 1] units.
  expected = ((_pil_resize(np.asarray(image), 24, 16, "pil_lanczos") / 255.0 - np.array(augment.IMAGENET_MEAN))
              / np.array(augment.IMAGENET_STD))
  assert input_config.resize == "pil_lanczos"
  bound = two_pass_bound(IMAGE.shape[0], 24, "pil_lanczos") / 255.0 / min(augment.IMAGENET_STD)
  assert np.abs(plain - expected).max() <= bound
  # the eval transform follows config.input.resize too.
  input_config.resize = "tf_bilinear"
  plain = augment.train_transform(image, _seed(1), input_config).numpy()
  np.testing.assert_array_equal(plain, augment.eval_transform(image, 24, 16, "tf_bilinear").numpy())
  expected = ((_bilinear_reference(np.asarray(image, np.float64) / 255.0, 24, 16) - np.array(augment.IMAGENET_MEAN))
              / np.array(augment.IMAGENET_STD))
  # 12 x 8 -> 24 x 16 puts every source position at an exact dyadic value: only the lerps round (6u of values <= 255),
  # then /255 (<= 2u), then the normalisation: normalised_bound(8u) ~ 48u ~ 2.9e-6.
  np.testing.assert_allclose(plain, expected, rtol=0, atol=normalised_bound(8 * U))


@pytest.mark.parametrize("method", ["pil_lanczos", "tf_bilinear"])
def test_the_eval_stream_resizes_with_config_input_resize(tiny_sets, input_config, method):
  """Test images go through the training resize: the eval stream of stored 32 x 16 images at 48 x 24 (upscaled) is
  the Pillow-decoded file resized by `method` (Pillow's LANCZOS within the two-pass bound; tf_bilinear exactly the
  op), normalised."""
  image_set = tiny_sets["test_visible"]
  input_config.height, input_config.width, input_config.resize = 48, 24, method
  batch = next(pipeline.eval_batches(image_set, input_config, 8))
  for row, i in enumerate(batch["index"][:3]):
    pixels = np.asarray(Image.open(image_set.paths[i]).convert("RGB"))
    if method == "pil_lanczos":
      expected = _pil_resize_horizontal_first(pixels, 48, 24, method)
      tolerance = two_pass_bound(pixels.shape[0], 48, method)
    else:
      expected = augment.resize(tf.constant(pixels), 48, 24, "tf_bilinear").numpy().astype(np.float64)
      # The same op, so the same pixels: only /255 (<= 2u) and the normalisation round, normalised_bound(2u) ~ 21u;
      # in grey levels, as the check below divides by 255 and the smallest std.
      tolerance = normalised_bound(2 * U) * 255.0 * min(augment.IMAGENET_STD)
    normalised = (expected / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    assert np.abs(batch["images"][row] - normalised).max() <= tolerance / 255.0 / min(augment.IMAGENET_STD)
    if method == "pil_lanczos":  # the other method's pixels are outside that bound: the stream's choice shows.
      other = augment.resize(tf.constant(pixels), 48, 24, "tf_bilinear").numpy()
      assert np.abs(other - expected).max() > 2 * tolerance


def test_a_workdir_written_before_config_input_resize_keeps_its_resize(tmp_path):
  """Runs stored without the field were trained and tested with tf.image.resize: reading them back keeps that."""
  old = default.get_config().to_dict()
  del old["input"]["resize"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert run_config.load_stored(str(tmp_path)).input.resize == "tf_bilinear"
  new = default.get_config().to_dict()
  (tmp_path / "config.json").write_text(json.dumps(new))
  assert run_config.load_stored(str(tmp_path)).input.resize == "pil_lanczos"
