"""Image transforms of the train and eval streams, as TensorFlow ops on one image.

Images are float32 [H, W, 3] (channels R, G, B). Before `normalize` the values are in [0, 1]; after it,
in ImageNet-standardised units. Every random op is stateless: it takes a `seed` (int32/int64 [2]) and is
a pure function of (image, seed), so the pipeline derives one seed per (run seed, step, image index) and
the stream is reproducible and resumable.

Train recipe (FDNM_SPEC.md §3; DEEN's transform_regdb/transform_sysu, with CAJ's channel augmentation):
  resize to H x W -> zero-pad `pad` -> random grayscale -> random crop back to H x W -> horizontal flip
  -> normalise -> random erasing -> channel augmentation.
Eval: resize -> normalise.

Resize (`config.input.resize`): the references resize with PIL before any transform. DEEN's data loaders
(ZYK100/LLCM DEEN/data_loader.py, pre_process_sysu.py; AGW's the same at 288 x 144) call
`img.resize((w, h), Image.ANTIALIAS)` on every training and test image, and `Image.ANTIALIAS` is Pillow's old name
of `Image.LANCZOS` (removed in Pillow 10); the `T.Resize((h, w))` of DEEN's test transform then finds the image at
its size already and changes nothing. So the default is "pil_lanczos". PIL's resampling, reproduced by `resize`:
separable, horizontal pass first; output pixel i of an axis of n_in -> n_out pixels sits at
center = (i + 0.5) * scale (scale = n_in / n_out) and averages the input pixels j in
[floor(center - support + 0.5), floor(center + support + 0.5)) (clipped to the image) with weights
filter((j + 0.5 - center) / s), normalised to sum 1, where s = max(scale, 1) stretches the filter on downscaling
(the antialiasing) and support = filter support * s. Filters (Pillow's Resample.c): bilinear (triangle, support 1),
bicubic (Keys a = -0.5, support 2), lanczos (sinc(x) sinc(x / 3), support 3). PIL clips each pass to 0..255 and
rounds it to uint8; here each pass is clipped in float32 and not rounded (so outputs differ from PIL's by its
rounding: at most 1/2 level per pass, tested against Pillow). The horizontal pass runs first, as in the Pillow the
references ran (< 10, which still had Image.ANTIALIAS; its Resample.c always resamples horizontally first). Pillow 13
runs the vertical pass first when the height shrinks and 2 (w_out - w_in) > h_out - h_in; the order matters only
where a lobed filter's first pass overshoots 0..255 and is clipped (sharp edges), and we keep the references' order.
"""

import math
from typing import Any, Callable, Optional

import tensorflow as tf

from fdnm_jax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean (R, G, B) of ImageNet, [0, 1] pixel units.
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel standard deviation (R, G, B) of ImageNet, [0, 1] units.
# RGB -> gray weights of PIL's convert("L") (ITU-R 601-2 luma), which DEEN's RandomGrayscale applies to PIL images.
GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)
ERASING_ATTEMPTS = 100  # rectangles tried by random erasing before giving up (as in DEEN's RandomErasing).
NUM_TRAIN_SEEDS = 5  # seeds one training image consumes: crop, grayscale, flip, erasing, channel.


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, C] in 0..255 -> float32 [H, W, C] in [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0


def _bilinear_filter(x: tf.Tensor) -> tf.Tensor:
  """PIL's BILINEAR filter (triangle): 1 - |x| for |x| < 1, else 0."""
  return tf.maximum(1.0 - tf.abs(x), 0.0)


def _bicubic_filter(x: tf.Tensor) -> tf.Tensor:
  """PIL's BICUBIC filter: Keys' cubic convolution with a = -0.5, support 2."""
  a = -0.5
  x = tf.abs(x)
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, inner, tf.where(x < 2.0, outer, tf.zeros_like(x)))


def _sinc(x: tf.Tensor) -> tf.Tensor:
  """sin(pi x) / (pi x), 1 at 0."""
  px = math.pi * x
  safe = tf.where(x == 0.0, tf.ones_like(px), px)
  return tf.where(x == 0.0, tf.ones_like(px), tf.sin(safe) / safe)


def _lanczos_filter(x: tf.Tensor) -> tf.Tensor:
  """PIL's LANCZOS filter (= the old Image.ANTIALIAS): sinc(x) sinc(x / 3) on [-3, 3), else 0."""
  return tf.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), tf.zeros_like(x))


# config.input.resize -> (filter, support in input pixels before the downscale stretch) of PIL's resampling.
PIL_FILTERS: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], float]] = {
    "pil_lanczos": (_lanczos_filter, 3.0),
    "pil_bicubic": (_bicubic_filter, 2.0),
    "pil_bilinear": (_bilinear_filter, 1.0),
}
RESIZE_METHODS = tuple(PIL_FILTERS) + ("tf_bilinear",)  # the values config.input.resize accepts.
DEFAULT_RESIZE = "pil_lanczos"  # DEEN's / AGW's Image.ANTIALIAS (module docstring).


def check_resize_method(method: str) -> None:
  """Raises ConfigError unless `method` is one of RESIZE_METHODS (config.input.resize)."""
  if method not in RESIZE_METHODS:
    raise ConfigError(f"config.input.resize={method!r} is not a resize method: use one of "
                      f"{', '.join(RESIZE_METHODS)} ({DEFAULT_RESIZE} = the references' PIL Image.ANTIALIAS).")


def pil_resize_band(in_size: Any, out_size: int, method: str) -> tuple[tf.Tensor, tf.Tensor]:
  """PIL's resampling of one axis of `in_size` -> `out_size` pixels (module docstring) as a band: output pixel i is
  sum_k taps[i, k] * input[index[i, k]], k < PIL's ksize = 2 ceil(support) + 1.

  Returns:
    index: int32 [out_size, ksize] input pixels (taps past PIL's window have weight 0 and a clamped index);
    taps: float32 [out_size, ksize], each row normalised to sum 1 (computed in float64, like PIL's).
  `in_size` may be a tensor (images of any size inside tf.data).
  """
  if method not in PIL_FILTERS:
    raise ConfigError(f"pil_resize_band: {method!r} is not a PIL filter ({', '.join(PIL_FILTERS)})")
  kernel, support = PIL_FILTERS[method]
  n = tf.cast(in_size, tf.float64)
  scale = n / float(out_size)
  stretch = tf.maximum(scale, 1.0)
  support = support * stretch
  center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
  first = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  stop = tf.minimum(tf.floor(center + support + 0.5), n)
  ksize = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
  j = first[:, None] + tf.range(ksize, dtype=tf.float64)[None, :]
  taps = kernel((j - center[:, None] + 0.5) * (1.0 / stretch))
  taps = tf.where(j < stop[:, None], taps, tf.zeros_like(taps))
  taps = tf.math.divide_no_nan(taps, tf.reduce_sum(taps, axis=1, keepdims=True))
  index = tf.minimum(tf.cast(j, tf.int32), tf.cast(in_size, tf.int32) - 1)
  return index, tf.cast(taps, tf.float32)


def pil_resize_weights(in_size: Any, out_size: int, method: str) -> tf.Tensor:
  """The band of `pil_resize_band` as a dense float32 [out_size, in_size] matrix (row i = output pixel i's weights
  over the input pixels; the clamped taps past the window add 0)."""
  index, taps = pil_resize_band(in_size, out_size, method)
  rows = tf.broadcast_to(tf.range(out_size, dtype=tf.int32)[:, None], tf.shape(index))
  coordinates = tf.reshape(tf.stack([rows, index], axis=-1), [-1, 2])
  return tf.scatter_nd(coordinates, tf.reshape(taps, [-1]), tf.stack([out_size, tf.cast(in_size, tf.int32)]))


class ResizeWeights:
  """`pil_resize_weights` computed once, outside any image's graph, for the input sizes a data set is known to have.

  `resize` builds an axis's weights per image (the input size is only known at run time), about 25 small ops per
  axis: at small network inputs that is most of the train stream's CPU time (docs/benchmarks.md). With this table,
  an image whose axis has one of the listed sizes takes the stored matrix (the same ops run once, eagerly, on the
  same CPU kernels: bit-identical weights); any other size computes its own, as without the table.

  Args:
    in_heights, in_widths: input sizes (pixels) to precompute, e.g. those of a set's first images.
    height, width: the output size.
    method: a PIL filter name of RESIZE_METHODS ("tf_bilinear" needs no weights: the table stays empty).
  """

  def __init__(self, in_heights, in_widths, height: int, width: int, method: str):
    check_resize_method(method)
    self.height, self.width, self.method = int(height), int(width), method
    pil = method in PIL_FILTERS
    self.rows = {int(n): pil_resize_weights(int(n), self.height, method) for n in set(in_heights)} if pil else {}
    self.cols = {int(n): pil_resize_weights(int(n), self.width, method) for n in set(in_widths)} if pil else {}

  def matches(self, height: int, width: int, method: str) -> bool:
    return (height, width, method) == (self.height, self.width, self.method)


def _axis_weights(in_size: tf.Tensor, out_size: int, method: str, known: dict) -> tf.Tensor:
  """`pil_resize_weights(in_size, out_size, method)`, taken from `known` {in_size: matrix} when it is there."""
  def compute():
    return pil_resize_weights(in_size, out_size, method)
  weights = compute
  for n, matrix in sorted(known.items()):
    weights = (lambda n=n, matrix=matrix, other=weights:
               tf.cond(tf.equal(in_size, n), lambda: tf.identity(matrix), other))
  return weights()


def resize(image: tf.Tensor, height: int, width: int, method: str = DEFAULT_RESIZE,
           weights: Optional[ResizeWeights] = None) -> tf.Tensor:
  """Resizes [h, w, C] (uint8, or float in 0..255 pixel units) to float32 [height, width, C], 0..255 units.

  method (config.input.resize): "pil_lanczos" | "pil_bicubic" | "pil_bilinear" = PIL's `Image.resize` with that
  filter (antialiased on downscale, module docstring): the horizontal pass, clipped to [0, 255], then the
  vertical pass, clipped, each a matrix product with `pil_resize_weights` (built per image from the few taps of
  `pil_resize_band`: cheap next to the products, which TensorFlow runs faster than a gather of the band); a pass
  whose size does not change is skipped (as in PIL; its weights are the identity anyway). "tf_bilinear" =
  `tf.image.resize` bilinear with half-pixel centres and no antialiasing (the project's resize before PIL's), not
  clipped. A same-size resize returns the image unchanged. `weights` (a `ResizeWeights` for this height, width
  and method) supplies the matrices of the input sizes it holds; the result is the same.
  """
  check_resize_method(method)
  if weights is not None and not weights.matches(height, width, method):
    raise ValueError(f"resize: weights for {weights.height}x{weights.width} {weights.method}, asked for "
                     f"{height}x{width} {method}")
  x = tf.cast(image, tf.float32)
  if method == "tf_bilinear":
    return tf.image.resize(x, (height, width), method="bilinear", antialias=False)
  known_rows, known_cols = (weights.rows, weights.cols) if weights is not None else ({}, {})
  in_h, in_w = x.shape[0], x.shape[1]
  size = tf.shape(x)
  x = tf.transpose(x, [2, 0, 1])  # [C, h, w]: both passes are plain (broadcast) matrix products.
  if in_w is None or in_w != width:
    x = tf.matmul(x, _axis_weights(size[1], width, method, known_cols), transpose_b=True)
    x = tf.clip_by_value(x, 0.0, 255.0)
  if in_h is None or in_h != height:
    x = tf.matmul(_axis_weights(size[0], height, method, known_rows), x)
    x = tf.clip_by_value(x, 0.0, 255.0)
  return tf.transpose(x, [1, 2, 0])


def pad_and_random_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Pads `pad` zero pixels on each side, then crops a random window of the input's size.

  [H, W, C] -> [H, W, C]; the window's top-left offset is uniform over the (2*pad + 1)^2 positions.
  """
  if pad <= 0:
    return image
  size = image.shape if image.shape.is_fully_defined() else tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, size, seed=seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors [H, W, C] left-right with probability 0.5."""
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """[H, W, 3] -> [H, W, 3] with every channel = 0.299 R + 0.587 G + 0.114 B."""
  gray = tf.reduce_sum(image * tf.constant(GRAYSCALE_WEIGHTS, image.dtype), axis=-1, keepdims=True)
  return tf.tile(gray, [1, 1, 3])


def random_grayscale(image: tf.Tensor, probability: float, seed: tf.Tensor) -> tf.Tensor:
  """`grayscale(image)` with probability `probability`, else the image. [H, W, 3] -> [H, W, 3]."""
  if probability <= 0:
    return image
  apply = tf.random.stateless_uniform([], seed=seed) < probability
  return tf.where(apply, grayscale(image), image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """(image - IMAGENET_MEAN) / IMAGENET_STD per channel; [H, W, 3] in [0, 1] -> float32 [H, W, 3]."""
  return (image - tf.constant(IMAGENET_MEAN, image.dtype)) / tf.constant(IMAGENET_STD, image.dtype)


def erasing_rectangle(height: int, width: int, probability: float, area_range: tuple[float, float],
                      min_aspect: float, seed: tf.Tensor) -> tf.Tensor:
  """The (top, left, h, w) int32 [4] rectangle random erasing picks; h = w = 0 when it erases nothing.

  DEEN's / AGW's RandomErasing (Zhong et al. 2017): with probability `probability`, up to 100 attempts of
  target area = U(area_range) * H * W, aspect = U(min_aspect, 1 / min_aspect), h = round(sqrt(area *
  aspect)), w = round(sqrt(area / aspect)); the first attempt with h < H and w < W is taken, its top-left
  corner uniform over the positions where it fits (top in 0..H-h, left in 0..W-w). Rounding is half to
  even, like Python's round.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  apply = tf.random.stateless_uniform([], seed=seeds[0]) < probability
  area = float(height * width)
  target = tf.random.stateless_uniform([ERASING_ATTEMPTS], seed=seeds[1], minval=area_range[0],
                                       maxval=area_range[1]) * area
  aspect = tf.random.stateless_uniform([ERASING_ATTEMPTS], seed=seeds[2], minval=min_aspect,
                                       maxval=1.0 / min_aspect)
  h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  valid = (h < height) & (w < width)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
  found = apply & tf.reduce_any(valid)
  h, w = h[first], w[first]
  top = tf.cast(tf.random.stateless_uniform([], seed=seeds[3]) * tf.cast(height - h + 1, tf.float32), tf.int32)
  left = tf.cast(tf.random.stateless_uniform([], seed=seeds[4]) * tf.cast(width - w + 1, tf.float32), tf.int32)
  top = tf.minimum(top, height - h)
  left = tf.minimum(left, width - w)
  zero = tf.constant(0, tf.int32)
  return tf.stack([tf.where(found, top, zero), tf.where(found, left, zero), tf.where(found, h, zero),
                   tf.where(found, w, zero)])


def random_erasing(image: tf.Tensor, probability: float, area_range: tuple[float, float], min_aspect: float,
                   seed: tf.Tensor, fill: tuple[float, ...] = IMAGENET_MEAN) -> tf.Tensor:
  """Erases the rectangle of `erasing_rectangle` in a normalised [H, W, 3] image, writing `fill` into it.

  As in DEEN, AGW and CAJ, the fill is the literal numbers (0.485, 0.456, 0.406) written into the
  already-normalised image (so, not the mean colour, which would be 0 there); reproduced as is.
  Needs a static image size.
  """
  if probability <= 0:
    return image
  height, width = int(image.shape[0]), int(image.shape[1])
  top, left, h, w = tf.unstack(erasing_rectangle(height, width, probability, area_range, min_aspect, seed))
  rows = tf.range(height)
  cols = tf.range(width)
  inside = (((rows >= top) & (rows < top + h))[:, None] & ((cols >= left) & (cols < left + w))[None, :])
  return tf.where(inside[..., None], tf.constant(fill, image.dtype), image)


def channel_augmentation(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """CAJ's channel augmentation (ChannelAdap): with p = 3/4 every channel <- one of R, G, B (each 1/4).

  Draws c uniform in {0, 1, 2, 3}; c < 3 replaces all channels by channel c, c = 3 keeps the image. CAJ's
  ChannelAdapGray also grays half of the kept images; here that is `random_grayscale`'s job.
  [H, W, 3] -> [H, W, 3].
  """
  choice = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=4, dtype=tf.int32)
  picked = tf.tile(tf.gather(image, tf.minimum(choice, 2), axis=-1)[..., None], [1, 1, 3])
  return tf.where(choice < 3, picked, image)


def train_transform(image: tf.Tensor, seed: tf.Tensor, input_config: Any,
                    weights: Optional[ResizeWeights] = None) -> tf.Tensor:
  """The training augmentation of one decoded image (recipe in the module docstring).

  Args:
    image: uint8 [h, w, 3], any size.
    seed: int32/int64 [2], this image's seed.
    input_config: `config.input` (height, width, resize, pad, flip, random_grayscale, random_erasing,
      erasing_area, erasing_min_aspect, channel_aug); a switched-off op consumes no randomness, and the
      others' randomness does not depend on which ops are on.
    weights: precomputed resize weights (`ResizeWeights`), or None.
  Returns:
    float32 [height, width, 3], normalised.
  """
  c = input_config
  seeds = tf.random.experimental.stateless_split(seed, NUM_TRAIN_SEEDS)
  x = resize(image, c.height, c.width, c.resize, weights) / 255.0
  # DEEN pads, grays, then crops; graying is per pixel and keeps the zero padding zero, so graying first
  # and then padding and cropping gives the same image.
  x = random_grayscale(x, c.random_grayscale, seeds[1])
  x = pad_and_random_crop(x, c.pad, seeds[0])
  if c.flip:
    x = random_flip(x, seeds[2])
  x = normalize(x)
  x = random_erasing(x, c.random_erasing, tuple(c.erasing_area), c.erasing_min_aspect, seeds[3])
  if c.channel_aug:
    x = channel_augmentation(x, seeds[4])
  return tf.ensure_shape(x, (c.height, c.width, 3))


def eval_transform(image: tf.Tensor, height: int, width: int, method: str = DEFAULT_RESIZE,
                   weights: Optional[ResizeWeights] = None) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 [height, width, 3]: resize (`method` = config.input.resize, as in training;
  `weights` as in `resize`), normalise."""
  return normalize(resize(image, height, width, method, weights) / 255.0)
