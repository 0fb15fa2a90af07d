"""TFDS builder of CASIA NIR-VIS 2.0 (manual_dir = the download folder), on the raw reader `casia_nir_vis`.

One builder config per fold (fold_1 .. fold_10). Splits, in reader order (`tfds_builders.ReIdBuilder`):
  train:   the fold's vis_train_<k>.txt images (modality 0), then nir_train_<k>.txt (modality 1), subjects with
           both modalities only (as `casia_nir_vis.read_casia_nir_vis` gives them);
  gallery: vis_gallery_<k>.txt (VIS, modality 0);
  probe:   nir_probe_<k>.txt (NIR, modality 1).
person_id is the subject number of the path, camera_id the session (s1..s4 -> 1..4). Metadata: the fold, the
counts (images and subjects per split) and the reader options used.

The builder is made with the reader options (`modality_suffix`, `skip_missing`) as constructor arguments; the
prepared folder is `<data_dir>/casia_nir_vis/fold_<k>/1.0.0`, read back by `read_prepared_fold`.
"""

import numpy as np
import tensorflow_datasets as tfds

from fdnm_jax.errors import ConfigError
from input_pipeline.datasets import casia_nir_vis, tfds_builders
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet


def counts(sets: dict) -> dict[str, int]:
  """Images and subjects of each set of `read_casia_nir_vis`: <set>_images, <set>_subjects."""
  out = {}
  for name, s in sets.items():
    out[f"{name}_images"] = len(s)
    out[f"{name}_subjects"] = int(len(np.unique(s.labels)))
  return out


class CasiaNirVis(tfds_builders.ReIdBuilder):
  """CASIA NIR-VIS 2.0 (Li et al., CVPR Workshops 2013): 725 subjects, VIS and NIR face images in 4 sessions;
  View 2 = 10 folds of protocol lists. Splits: train (VIS then NIR), gallery (VIS), probe (NIR)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: one config per View-2 fold; train, gallery and probe splits."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"fold_{k}", description=f"CASIA NIR-VIS 2.0 View 2 fold {k} "
                                             f"(protocols/*_{k}.txt)") for k in range(1, casia_nir_vis.NUM_FOLDS + 1)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request CASIA NIR-VIS 2.0 from CASIA (http://www.cbsr.ia.ac.cn/english/NIR-VIS-2.0-Database.html), unpack "
      "the session archives and pass the folder holding s1/ .. s4/ and protocols/ as --manual_dir; "
      + casia_nir_vis.LAYOUT + ".")

  def __init__(self, *, modality_suffix: str = "", skip_missing: bool = False, **kwargs):
    """Args: modality_suffix, skip_missing: the reader options (casia_nir_vis module docstring); kwargs: the base
    builder's (skip_corrupt) and tfds's (data_dir, config, version)."""
    self.modality_suffix = str(modality_suffix)
    self.skip_missing = bool(skip_missing)
    super().__init__(**kwargs)

  @property
  def fold(self) -> int:
    return int(self.builder_config.name.split("_")[1])

  def read(self, root: str) -> tfds_builders.ReaderOutput:
    sets = casia_nir_vis.read_casia_nir_vis(root, self.fold, modality_suffix=self.modality_suffix,
                                            skip_missing=self.skip_missing)
    metadata = {"dataset": casia_nir_vis.NAME, "fold": self.fold, "counts": counts(sets),
                "modality_suffix": self.modality_suffix, "skip_missing": self.skip_missing}
    return tfds_builders.ReaderOutput(
        splits={"train": (sets["train_visible"], sets["train_infrared"]), "gallery": (sets["gallery"],),
                "probe": (sets["probe"],)},
        metadata=metadata)


def read_prepared_fold(data_dir: str, fold: int, test_only: bool = False) -> dict[str, ImageSet]:
  """The four sets of a prepared fold folder, as `casia_nir_vis.read_casia_nir_vis` names them.

  Args:
    data_dir: the prepared version folder (holding dataset_info.json), e.g. <dir>/casia_nir_vis/fold_3/1.0.0.
    fold: the fold the config asks for (config.data.fold); must be the folder's.
    test_only: read the gallery and probe splits only (no "train_visible", "train_infrared" in the result).
  Raises:
    ValueError: the folder holds another data set or another fold (names both and the fix).
  """
  prepared = tfds_builders.read_prepared(data_dir, ("gallery", "probe") if test_only else None)
  if prepared.name != "casia_nir_vis":
    raise ConfigError(f"config.data.data_dir={data_dir} holds data set {prepared.name!r}, not casia_nir_vis: point "
                      "it at a folder prepared by the CasiaNirVis builder.")
  stored = prepared.metadata.get("fold")
  if stored is None or int(stored) != int(fold):
    raise ConfigError(f"config.data.data_dir={data_dir} is CASIA NIR-VIS 2.0 fold {stored} but config.data.fold is "
                      f"{fold}: pass --config.data.fold={stored} or the fold_{fold} folder.")
  sets = {"gallery": prepared.image_set("gallery", VISIBLE), "probe": prepared.image_set("probe", INFRARED)}
  if not test_only:
    sets.update(train_visible=prepared.image_set("train", VISIBLE),
                train_infrared=prepared.image_set("train", INFRARED))
  return sets


def source_sets(config, test_only: bool = False) -> tuple[ImageSet, ImageSet, dict[str, ImageSet]]:
  """The sets of a CASIA NIR-VIS 2.0 run: (train VIS, train NIR, test sets) for `input_pipeline.sources`.

  Training uses fold config.data.fold; the test sets are "probe_<k>" (NIR) and "gallery_<k>" (VIS) for every
  scored fold k (config.evals.face_folds, () = the trained fold), the names `fdnm_jax.evaluation.face` reads.
  From config.data.data_dir (a prepared fold folder, one fold only) or config.data.root (the download).
  `test_only`: read no training list (the train sets come back empty).

  Raises:
    ValueError: a bad fold, no root/data_dir, or several folds asked of a prepared folder.
  """
  fold = casia_nir_vis.check_fold(config.data.fold)
  folds = tuple(casia_nir_vis.check_fold(f) for f in (tuple(config.evals.face_folds) or (fold,)))
  if config.data.get("data_dir"):
    if folds != (fold,):
      raise ConfigError(f"config.evals.face_folds={folds}: a prepared folder (config.data.data_dir) holds one fold "
                        f"({fold}); score other folds from the download (config.data.root) or leave face_folds ().")
    by_fold = {fold: read_prepared_fold(config.data.data_dir, fold, test_only)}
  else:
    if not config.data.root:
      raise ConfigError("config.dataset='casia_nir_vis' needs the downloaded CASIA NIR-VIS 2.0 folder: pass "
                        "--config.data.root=/path/to/NIR-VIS-2.0 (it holds s1/ .. s4/ and protocols/), or a prepared "
                        "fold with --config.data.data_dir.")
    options = dict(modality_suffix=config.data.modality_folder_suffix, skip_missing=config.data.skip_missing_images)
    by_fold = {} if test_only else {fold: casia_nir_vis.read_casia_nir_vis(config.data.root, fold, **options)}
    for k in folds:
      if k not in by_fold:
        by_fold[k] = casia_nir_vis.read_fold(config.data.root, k, ("gallery", "probe"), **options)
  test_sets = {}
  for k in folds:
    test_sets[f"probe_{k}"] = by_fold[k]["probe"]
    test_sets[f"gallery_{k}"] = by_fold[k]["gallery"]
  if test_only:
    return ImageSet((), (), (), VISIBLE), ImageSet((), (), (), INFRARED), test_sets
  return by_fold[fold]["train_visible"], by_fold[fold]["train_infrared"], test_sets
