"""TFDS builders of the cross-modality data sets, built on the raw readers (one generic base, one subclass each).

A builder reads the folder the user downloaded (tfds "manual_dir") with the same reader as `config.data.root` uses
(so the layout checks, the order and the counts are the same code) and writes one example per image:

  image:     the file's bytes as downloaded (JPEG / BMP / PNG, not re-encoded); decode with tf.io.decode_image.
  person_id: int32, the label the reader gives (SYSU / LLCM test: the person id; RegDB: the list file's label).
  camera_id: int32, the reader's camera number.
  modality:  int32, 0 visible, 1 infrared (ImageSet.VISIBLE / INFRARED).
  path:      the file's path relative to the download folder, "/"-separated (e.g. "cam3/0001/0004.jpg").
  index:     int32, the image's position in its split (visible images first, then infrared, each in reader order).

Examples are stored in reader order (`disable_shuffling`), so reading a prepared folder back gives exactly the
ImageSets of the raw reader (`read_prepared`). Reading back needs no builder code: `tfds.builder_from_directory`.

Writing a builder for another data set (e.g. a face set): subclass `ReIdBuilder`, set VERSION, RELEASE_NOTES and
MANUAL_DOWNLOAD_INSTRUCTIONS, and implement `read(root) -> ReaderOutput`:

    class CasiaNirVis(tfds_builders.ReIdBuilder):
      VERSION = tfds.core.Version("1.0.0")
      RELEASE_NOTES = {"1.0.0": "First release."}
      MANUAL_DOWNLOAD_INSTRUCTIONS = "Download ... and pass its folder as --manual_dir."
      def read(self, root):
        sets = read_casia(root)                        # your raw reader: name -> ImageSet
        return tfds_builders.ReaderOutput(
            splits={"train": (sets["train_visible"], sets["train_infrared"]),
                    "gallery": (sets["gallery"],), "probe": (sets["probe"],)},
            metadata={"counts": {...}, "published_differences": [...]})

Each split is the concatenation of its ImageSets; reading back splits it by modality again
(`PreparedSet.image_set(split, modality)`). The class name gives the data set name (CasiaNirVis -> casia_nir_vis).
Metadata must be JSON-serialisable; it is stored in the prepared folder (`reid_metadata.json`) and comes back as
`PreparedSet.metadata`.

Corrupt images: every image is decoded once while building; an unreadable or zero-byte file stops the build with
`CorruptImageError` naming it, unless the builder is made with `skip_corrupt=True`, which leaves it out and counts it
(`ReIdBuilder.skipped`, and metadata["skipped_corrupt"]).
"""

import abc
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fdnm_jax.errors import DataError, MissingFileError
from input_pipeline.datasets import folders, llcm, regdb, sysu
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

METADATA_FILE = "reid_metadata.json"  # extra metadata written beside dataset_info.json.


class CorruptImageError(DataError):
  """An image of the download that is empty, truncated or not an image; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ReaderOutput:
  """What a builder's `read` returns.

  Attributes:
    splits: TFDS split name (e.g. "train", "test") -> the ImageSets stored in it, in order (absolute paths under
      the download folder).
    metadata: JSON-serialisable facts kept with the prepared set (counts, differences from the published counts,
      evaluation files such as SYSU-MM01's official gallery permutations).
  """
  splits: Mapping[str, Sequence[ImageSet]]
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def check_image_bytes(data: bytes, path: str) -> None:
  """Raises CorruptImageError naming `path` if `data` is empty or does not decode as an image."""
  if not data:
    raise CorruptImageError(f"Image {path} is empty (0 bytes): re-download it, or pass --skip_corrupt to leave "
                            "it out (counted).")
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    raise CorruptImageError(f"Image {path} is corrupt or truncated ({e.message.strip()}): re-download it, or pass "
                            "--skip_corrupt to leave it out (counted).") from None


class ReIdBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic builder: one example per image of the ImageSets of `read(manual_dir)`; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: the raw download's images, ids, cameras, modality and paths."}

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    """Args: skip_corrupt: leave out (and count) unreadable images instead of stopping; kwargs: tfds's
    (data_dir, config, version)."""
    self.skip_corrupt = bool(skip_corrupt)
    self.skipped: list[str] = []
    self._metadata: dict[str, Any] = {}
    super().__init__(**kwargs)

  @abc.abstractmethod
  def read(self, root: str) -> ReaderOutput:
    """Reads the download folder `root` with the data set's raw reader (layout checks included)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=tf.string),
            "person_id": tfds.features.Tensor(shape=(), dtype=np.int32),
            "camera_id": tfds.features.Tensor(shape=(), dtype=np.int32),
            "modality": tfds.features.Tensor(shape=(), dtype=np.int32),
            "path": tfds.features.Text(),
            "index": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        disable_shuffling=True,
        description=(self.__doc__ or "").strip(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.path.abspath(os.fspath(dl_manager.manual_dir))
    output = self.read(root)
    self._metadata = dict(output.metadata)
    self.skipped = []
    return {name: self._generate_examples(root, tuple(sets)) for name, sets in output.splits.items()}

  def _generate_examples(self, root: str, sets: Sequence[ImageSet]) -> Iterator[tuple[int, dict]]:
    index = 0
    for image_set in sets:
      for path, label, camera in zip(image_set.paths, image_set.labels, image_set.cameras):
        with open(path, "rb") as f:
          data = f.read()
        try:
          check_image_bytes(data, path)
        except CorruptImageError:
          if not self.skip_corrupt:
            raise
          self.skipped.append(path)
          continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        yield index, {"image": data, "person_id": int(label), "camera_id": int(camera),
                      "modality": int(image_set.modality), "path": rel, "index": index}
        index += 1

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    metadata = dict(self._metadata)
    metadata["skipped_corrupt"] = [os.path.relpath(p, os.path.abspath(os.fspath(dl_manager.manual_dir)))
                                   for p in self.skipped]
    metadata["builder"] = self.name
    with tf.io.gfile.GFile(os.path.join(self.data_path, METADATA_FILE), "w") as f:
      f.write(json.dumps(metadata, indent=1, sort_keys=True))


def _counts_metadata(name: str, counts: Mapping[str, int], published: Optional[Mapping[str, int]] = None) -> dict:
  return {"dataset": name, "counts": dict(counts),
          "published_differences": folders.compare_with_published(name, counts, published)}


class SysuMm01(ReIdBuilder):
  """SYSU-MM01 (Wu et al., ICCV 2017): 491 identities, 4 RGB + 2 IR cameras. Splits: train (train_id + val_id, RGB
  then IR), test (test_id, RGB cams 1, 2, 4, 5 then IR cams 3, 6). Metadata: counts, and the official gallery
  permutations of exp/rand_perm_cam.mat when the download has it."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request SYSU-MM01 from its authors (https://github.com/wuancong/SYSU-MM01), unpack it and pass the folder "
      "holding cam1/ .. cam6/ and exp/ as --manual_dir. Optionally put evaluation/data_split/rand_perm_cam.mat of "
      "that repository into exp/ for the official gallery permutations.\n" + sysu._LAYOUT)

  def read(self, root: str) -> ReaderOutput:
    sets = sysu.read_sysu(root)
    metadata = _counts_metadata("SYSU-MM01", sysu.sysu_counts(sets))
    metadata["rand_perm_cam"] = sysu.read_rand_perm(root) if sysu.has_rand_perm(root) else None
    return ReaderOutput(splits={"train": (sets["train_visible"], sets["train_infrared"]),
                                "test": (sets["test_visible"], sets["test_infrared"])}, metadata=metadata)


class Regdb(ReIdBuilder):
  """RegDB (Nguyen et al., Sensors 2017): 412 identities x 10 visible + 10 thermal images; one config per split
  (split_1 .. split_10). Splits: train (visible then thermal), test_visible, test_thermal."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"split_{t}", description=f"RegDB split {t} (idx/*_{t}.txt)")
                     for t in range(1, regdb.NUM_TRIALS + 1)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request RegDB from its authors (Dongguk University), unpack it and pass the folder holding Visible/, "
      "Thermal/ and idx/ as --manual_dir; " + regdb._LAYOUT + ".")

  def read(self, root: str) -> ReaderOutput:
    trial = int(self.builder_config.name.split("_")[1])
    sets = regdb.read_regdb(root, trial)
    metadata = _counts_metadata("RegDB", regdb.regdb_counts(sets))
    metadata["split"] = trial
    return ReaderOutput(splits={"train": (sets["train_visible"], sets["train_thermal"]),
                                "test_visible": (sets["test_visible"],),
                                "test_thermal": (sets["test_thermal"],)}, metadata=metadata)


class Llcm(ReIdBuilder):
  """LLCM (Zhang & Wang, CVPR 2023): 1,064 identities, 9 cameras, visible and near-infrared. Splits: train
  (visible then NIR), test_vis, test_nir."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request LLCM from its authors (https://github.com/ZYK100/LLCM), unpack it and pass the folder holding idx/, "
      "vis/, nir/, test_vis/ and test_nir/ as --manual_dir.\n" + llcm._LAYOUT)

  def read(self, root: str) -> ReaderOutput:
    sets = llcm.read_llcm(root)
    return ReaderOutput(splits={"train": (sets["train_visible"], sets["train_infrared"]),
                                "test_vis": (sets["test_visible"],), "test_nir": (sets["test_infrared"],)},
                        metadata=_counts_metadata("LLCM", llcm.llcm_counts(sets)))


BUILDERS = {"sysu_mm01": SysuMm01, "regdb": Regdb, "llcm": Llcm}  # --dataset of input_pipeline.prepare.


@dataclasses.dataclass(frozen=True)
class PreparedSet:
  """A prepared folder read back: split -> its ImageSets by modality (paths relative, `encoded` bytes set)."""
  data_dir: str
  name: str
  splits: Mapping[str, Mapping[int, ImageSet]]
  metadata: Mapping[str, Any]

  def image_set(self, split: str, modality: int) -> ImageSet:
    """The images of `modality` in `split` (an empty ImageSet if there are none)."""
    if split not in self.splits:
      raise DataError(f"prepared set {self.data_dir} has no split {split!r} (it has {sorted(self.splits)}): "
                      f"prepare it again with python -m input_pipeline.prepare.")
    return self.splits[split].get(modality, ImageSet((), np.zeros(0), np.zeros(0), modality, encoded=()))


def find_prepared(data_dir: str, name: str, config: Optional[str] = None) -> str:
  """The prepared version folder for builder `name` (and builder config `config`) under `data_dir`.

  `data_dir` may be the version folder itself (it holds dataset_info.json) or the --data_dir given to
  `python -m input_pipeline.prepare` (then <data_dir>/<name>[/<config>]/<highest version>/ is used).
  Raises:
    FileNotFoundError: neither is there (names both paths and the command that makes them).
  """
  data_dir = os.fspath(data_dir)
  if tf.io.gfile.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  base = os.path.join(data_dir, name, *([config] if config else []))
  versions = []
  if tf.io.gfile.isdir(base):
    for entry in tf.io.gfile.listdir(base):
      entry = entry.rstrip("/")
      parts = entry.split(".")
      if (len(parts) == 3 and all(p.isdigit() for p in parts)
          and tf.io.gfile.exists(os.path.join(base, entry, "dataset_info.json"))):
        versions.append((tuple(int(p) for p in parts), entry))
  if not versions:
    raise MissingFileError(
        f"No prepared {name}{' ' + config if config else ''} set in {data_dir}: neither {data_dir}/dataset_info.json "
        f"nor {base}/<version>/dataset_info.json exists. Make it with python -m input_pipeline.prepare "
        f"--dataset={name} --manual_dir=<the download> --data_dir={data_dir}.")
  return os.path.join(base, max(versions)[1])


def read_prepared(data_dir: str, splits: Optional[Sequence[str]] = None) -> PreparedSet:
  """Reads a prepared folder (local or gs://) with `tfds.builder_from_directory` (no builder code needed).

  Args:
    data_dir: the folder holding dataset_info.json (e.g. <data_dir>/sysu_mm01/1.0.0 or .../regdb/split_1/1.0.0).
    splits: read only these splits (None = all): evaluation reads the test splits alone, so a copy without the
      training split's files evaluates.
  Returns:
    A PreparedSet: every split split by modality into ImageSets in stored order, with paths relative to the
    download folder and the images' encoded bytes (`ImageSet.encoded`).
  Raises:
    FileNotFoundError: no dataset_info.json in `data_dir` (names it and the command that makes it).
  """
  data_dir = os.fspath(data_dir)
  if not tf.io.gfile.exists(os.path.join(data_dir, "dataset_info.json")):
    raise MissingFileError(
        f"{data_dir} is not a prepared data set folder (no dataset_info.json): point config.data.data_dir at the "
        "version folder that `python -m input_pipeline.prepare` printed, e.g. <data_dir>/sysu_mm01/1.0.0.")
  builder = tfds.builder_from_directory(data_dir)
  wanted, splits = splits, {}
  for split in builder.info.splits:
    if wanted is not None and split not in wanted:
      continue
    rows: dict[str, list] = {k: [] for k in ("image", "person_id", "camera_id", "modality", "path", "index")}
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      for k in rows:
        rows[k].append(example[k])
    order = np.argsort(np.asarray(rows["index"], np.int64), kind="stable")
    modality = np.asarray(rows["modality"], np.int32)[order]
    by_modality = {}
    for m in (VISIBLE, INFRARED):
      keep = order[modality == m]
      if len(keep):
        by_modality[m] = ImageSet(
            paths=tuple(rows["path"][i].decode("utf-8") for i in keep),
            labels=np.asarray(rows["person_id"], np.int32)[keep],
            cameras=np.asarray(rows["camera_id"], np.int32)[keep], modality=m,
            encoded=tuple(rows["image"][i] for i in keep))
    splits[split] = by_modality
  metadata = {}
  meta_path = os.path.join(data_dir, METADATA_FILE)
  if tf.io.gfile.exists(meta_path):
    with tf.io.gfile.GFile(meta_path) as f:
      metadata = json.loads(f.read())
  return PreparedSet(data_dir=data_dir, name=builder.name, splits=splits, metadata=metadata)
