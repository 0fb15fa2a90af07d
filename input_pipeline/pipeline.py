"""The train and eval streams: image lists -> tf.data (decode, augment, batch) -> host NumPy batches.

Knows nothing of JAX. Each process builds only its own slice of every global batch; the slices of all
processes, concatenated in process order, are exactly the single-process batch (same images, same
augmentation), because every random choice is keyed by the global position of the image in the batch.
"""

import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf

from fdnm_jax.errors import ConfigError, DataError, MissingFileError
from input_pipeline import augment
from input_pipeline.datasets.image_set import ImageSet
from input_pipeline.sampling import CrossModalitySampler


class ImageDecodeError(DataError):
  """An image file that cannot be read or decoded; the message names the file."""


def train_label_map(visible: ImageSet, infrared: ImageSet) -> dict[int, int]:
  """Person id -> class id: the ids of both train sets, sorted ascending, numbered 0..num_classes-1."""
  ids = np.union1d(visible.labels, infrared.labels)
  return {int(p): c for c, p in enumerate(ids)}


def num_classes(visible: ImageSet, infrared: ImageSet) -> int:
  """Number of classes of the ID loss: identities present in either train set."""
  return len(train_label_map(visible, infrared))


def decode(path: tf.Tensor) -> tf.Tensor:
  """Reads and decodes one image file (`decode_bytes`) to uint8 [h, w, 3]."""
  return decode_bytes(tf.io.read_file(path))


def _byte_source(image_sets: Sequence[ImageSet]):
  """i (int64 scalar tensor) -> the encoded bytes of image i of the concatenated sets.

  Sets read from files read `paths[i]`; prepared sets (ImageSet.encoded) look the bytes up in host memory through
  tf.numpy_function (no graph constant, so no 2 GB graph limit). All sets must be of the same kind.
  """
  kinds = {s.encoded is None for s in image_sets if len(s)}
  if len(kinds) > 1:
    raise ValueError("Cannot mix image sets read from files with prepared (encoded) ones in one stream.")
  if not kinds or kinds == {True}:
    paths = tuple(p for s in image_sets for p in s.paths)
    paths_t = tf.constant(paths if paths else ("",), tf.string)
    return lambda i: tf.io.read_file(tf.gather(paths_t, i))
  encoded = np.array([b for s in image_sets for b in s.encoded], dtype=object)

  def lookup(i):
    data = tf.numpy_function(lambda j: encoded[int(j)], [i], tf.string, stateful=False)
    return tf.ensure_shape(data, [])
  return lookup


def decode_bytes(data: tf.Tensor) -> tf.Tensor:
  """Decodes one encoded image (JPEG, PNG, BMP, GIF first frame, WebP) to uint8 [h, w, 3].

  JPEGs are decoded with the accurate integer IDCT (libjpeg's ISLOW, what PIL uses, so the pixels equal those the
  reference code reads); TensorFlow's default fast IDCT differs from them by up to a few grey levels.
  """
  def jpeg():
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

  def other():
    return tf.io.decode_image(data, channels=3, expand_animations=False)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def check_image(path: str) -> None:
  """Raises ImageDecodeError (or FileNotFoundError) naming `path` if it cannot be read and decoded."""
  if not os.path.isfile(path):
    raise MissingFileError(f"Image file {path} not found: restore it or remove it from the data set's list files.")
  try:
    decode(tf.constant(path))
  except tf.errors.OpError as e:
    raise ImageDecodeError(f"Cannot decode image {path} ({e.message.strip()}): the file is corrupt or not an "
                           "image; replace it (re-download or regenerate the data set) or remove it from the "
                           "list files.") from None


def resize_weights(read_bytes, first_images: Sequence[int], input_config: Any) -> augment.ResizeWeights:
  """`augment.ResizeWeights` at the input size for the sizes of images `first_images` of a `_byte_source`.

  A data set's images mostly share a few sizes (a camera's, a modality's), so the first image of each set gives
  the sizes worth precomputing. An image that cannot be read is left out here: the stream names it when it
  reaches it.
  """
  heights, widths = [], []
  for i in first_images:
    try:
      shape = decode_bytes(read_bytes(tf.constant(i, tf.int64))).shape
    except (tf.errors.OpError, ValueError):
      continue
    heights.append(int(shape[0]))
    widths.append(int(shape[1]))
  return augment.ResizeWeights(heights, widths, input_config.height, input_config.width, input_config.resize)


def _graph_function(fn):
  """`fn` for tf.data to trace as it is written, without AutoGraph's source conversion.

  The transforms use tf.cond / tf.where for data-dependent choices and Python `if` only on static values (config
  fields, static shapes), so AutoGraph would change nothing; converting them cost about 1-3 s of every process
  that builds a pipeline (docs/benchmarks.md).
  """
  return tf.autograph.experimental.do_not_convert(fn)


def train_batches(visible: ImageSet, infrared: ImageSet, input_config: Any, *, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, Any]]:
  """The endless training stream, batch `start_step` first.

  Global batch `step`: the CrossModalitySampler's P identities x K images per modality (identity by
  identity, the same identity order in both modalities), each image augmented by
  `augment.train_transform` with a seed keyed by (seed, step, position in the global batch: visible
  0..P*K-1, infrared P*K..2*P*K-1). This process yields its contiguous slice of each modality.

  Args:
    visible, infrared: the train image sets.
    input_config: `config.input` (height, width, num_ids_per_batch, num_instances, the augmentation
      fields, prefetch).
    seed: the run seed (config.seed), >= 0.
    start_step: the first step to yield (a resumed run passes its checkpoint step).
    process_index, process_count: this process and the number of processes; P*K must divide evenly.
  Yields:
    {"visible": float32 [b, H, W, 3], "infrared": float32 [b, H, W, 3] (normalised images),
     "visible_labels": int32 [b], "infrared_labels": int32 [b] (class ids of `train_label_map`),
     "step": int}, with b = P*K / process_count.
  Raises:
    ValueError: bad process arguments, P*K not divisible by process_count, or too few shared identities.
    ImageDecodeError / FileNotFoundError (when the batch is reached): an unreadable image, named.
  """
  c = input_config
  _check_process(process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  sampler = CrossModalitySampler(visible.labels, infrared.labels, c.num_ids_per_batch, c.num_instances, seed)
  global_size = sampler.batch_size
  if global_size % process_count:
    raise ConfigError(f"The global batch of P*K = {c.num_ids_per_batch}*{c.num_instances} = {global_size} images "
                      f"per modality does not split over {process_count} processes: make "
                      "config.input.num_ids_per_batch * num_instances a multiple of the process count.")
  local = global_size // process_count
  lo = process_index * local
  label_map = train_label_map(visible, infrared)
  classes = np.array([label_map[int(p)] for p in visible.labels] + [label_map[int(p)] for p in infrared.labels],
                     np.int32)
  all_paths = visible.paths + infrared.paths
  offset = len(visible)
  positions = np.concatenate([np.arange(lo, lo + local), global_size + np.arange(lo, lo + local)]).astype(np.int64)

  def files_of(step: int) -> np.ndarray:
    vis, ir = sampler.batch_indices(step)
    return np.concatenate([vis[lo:lo + local], ir[lo:lo + local] + offset])

  read_bytes = _byte_source((visible, infrared))
  weights = resize_weights(read_bytes, [i for i, n in ((0, len(visible)), (offset, len(infrared))) if n], c)
  classes_t = tf.constant(classes, tf.int32)
  positions_t = tf.constant(positions, tf.int64)

  def step_files(step):
    files = tf.numpy_function(lambda s: files_of(int(s)).astype(np.int64), [step], tf.int64, stateful=False)
    files = tf.ensure_shape(files, [2 * local])
    return tf.data.Dataset.from_tensor_slices((files, positions_t, tf.fill([2 * local], step)))

  def per_image(file, position, step):
    key = tf.stack([tf.constant(seed, tf.int64), step])
    image_seed = tf.random.experimental.stateless_fold_in(key, position)
    image = augment.train_transform(decode_bytes(read_bytes(file)), image_seed, c, weights)
    return image, tf.gather(classes_t, file), step

  ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max).flat_map(_graph_function(step_files))
  ds = ds.map(_graph_function(per_image), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(2 * local, drop_remainder=True).prefetch(max(int(c.prefetch), 0) or 1)

  def stream():
    iterator = iter(ds)
    step = start_step
    while True:
      try:
        images, labels, _ = next(iterator)
      except tf.errors.OpError as e:
        _raise_named([all_paths[i] for i in files_of(step)], e, f"training batch {step}",
                     visible.encoded is None)
      images, labels = images.numpy(), labels.numpy()
      yield {"visible": images[:local], "infrared": images[local:], "visible_labels": labels[:local],
             "infrared_labels": labels[local:], "step": step}
      step += 1

  return stream()


def eval_batches(image_set: ImageSet, input_config: Any, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, flip: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """The images of `image_set` in file order, resized and normalised, in global batches of `batch_size`.

  Global batch j holds images j*batch_size .. (j+1)*batch_size-1; the last one is padded to batch_size
  with zero images (mask False, index -1). Every process runs ceil(N / batch_size) batches and takes
  the contiguous slice process_index of each.

  Args:
    image_set: the images.
    input_config: `config.input` (height, width, resize, prefetch).
    batch_size: global batch size, a multiple of process_count.
    process_index, process_count: this process and the number of processes.
    flip: also yield the mirrored images.
  Yields:
    {"images": float32 [b, H, W, 3], "mask": bool [b] (True = a real image), "index": int32 [b] (position
     in image_set, -1 for padding)} and, with `flip`, "images_flipped": float32 [b, H, W, 3] (left-right
    mirror of "images"); b = batch_size / process_count.
  """
  c = input_config
  _check_process(process_index, process_count)
  if batch_size < 1 or batch_size % process_count:
    raise ConfigError(f"The eval batch size {batch_size} must be a positive multiple of the process count "
                      f"{process_count} (config.input.eval_batch_size).")
  n = len(image_set)
  local = batch_size // process_count
  num_batches = math.ceil(n / batch_size)
  index = np.arange(num_batches * batch_size, dtype=np.int64)
  index[index >= n] = -1
  index = index.reshape(num_batches, process_count, local)[:, process_index].reshape(-1)
  paths = image_set.paths
  read_bytes = _byte_source((image_set,))
  height, width = int(c.height), int(c.width)
  weights = resize_weights(read_bytes, [0] if n else [], c)

  def per_image(i):
    def load():
      return augment.eval_transform(decode_bytes(read_bytes(tf.maximum(i, 0))), height, width, c.resize, weights)
    return tf.cond(i >= 0, load, lambda: tf.zeros([height, width, 3], tf.float32)), i

  ds = tf.data.Dataset.from_tensor_slices(index)
  ds = ds.map(_graph_function(per_image), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local).prefetch(max(int(c.prefetch), 0) or 1)

  def stream():
    iterator = iter(ds)
    for j in range(num_batches):
      try:
        images, idx = next(iterator)
      except tf.errors.OpError as e:
        _raise_named([paths[i] for i in index[j * local:(j + 1) * local] if i >= 0], e, f"eval batch {j}",
                     image_set.encoded is None)
      idx = idx.numpy().astype(np.int32)
      batch = {"images": images.numpy(), "mask": idx >= 0, "index": idx}
      if flip:
        batch["images_flipped"] = np.ascontiguousarray(batch["images"][:, :, ::-1, :])
      yield batch

  return stream()


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got process_index={process_index}, "
                     f"process_count={process_count}.")


def _raise_named(paths: Sequence[str], error: tf.errors.OpError, where: str, from_files: bool = True) -> None:
  """Finds the unreadable file among `paths` (the batch that failed) and raises an error naming it."""
  if not from_files:
    raise ImageDecodeError(f"The input pipeline failed on {where} of a prepared data set ({error.message.strip()}); "
                           f"its images: {list(dict.fromkeys(paths))[:8]}. Prepare the set again "
                           "(python -m input_pipeline.prepare).") from error
  for path in dict.fromkeys(paths):
    check_image(path)
  raise RuntimeError(f"The input pipeline failed on {where} ({error.message.strip()}), yet every image of that "
                     "batch decodes on its own.") from error
