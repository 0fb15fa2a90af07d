"""Which image sets a config trains and evaluates on: the data-set registry.

Knows nothing of JAX. Each data set gives its train visible/infrared sets, its test sets
and the evaluation directions (query set, gallery set) with the protocol that scores them:
  - synthetic, regdb: protocol "regdb"; test sets "visible", "infrared" of split config.data.trial; both directions.
  - sysu: protocol "sysu"; test sets "visible" (RGB cams 1, 2, 4, 5) and "infrared" (IR cams 3, 6) of the test
    identities; one direction, infrared -> visible (the gallery is sampled per trial, fdnm_jax.evaluation.protocols).
  - llcm: protocol "llcm"; test sets "visible" (test_vis, cams 1..9) and "infrared" (test_nir, cams 1, 2, 4..9);
    both directions.
  - casia_nir_vis: protocol "face"; trains on fold config.data.fold; test sets "probe_<k>" (NIR) and "gallery_<k>"
    (VIS) per scored fold k (config.evals.face_folds, () = the trained fold); one direction, nir_to_vis.
sysu, llcm and regdb read config.data.root (the data set as downloaded, FDNM_SPEC.md §5); synthetic generates its set.
config.data.data_dir (prepare's --data_dir or the version folder `python -m input_pipeline.prepare` printed, local
or gs://) wins over root: the same ImageSets (labels, cameras, modality, paths relative to the download), decoded
from the stored bytes.
config.data.num_val_ids > 0 holds out the last N training identities as `DataSource.validation`.
`load_test_source` reads the test sets alone (evaluation: a copy of a data set without its training part works).
"""

import dataclasses
import logging
import os
from typing import Optional

import ml_collections
import numpy as np

from fdnm_jax.errors import ConfigError, DataError
from input_pipeline import image_check
from input_pipeline.datasets import casia_builder, llcm, regdb, synthetic, sysu, tfds_builders
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

KNOWN_DATASETS = ("synthetic", "regdb", "sysu", "llcm", "casia_nir_vis")
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalDirection:
  """One retrieval direction: queries from `query`, ranked against `gallery` (keys of test_sets)."""
  name: str
  query: str
  gallery: str


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Everything the trainer needs to know about a data set's files."""
  name: str
  protocol: str  # evaluation protocol: sysu | regdb | llcm (compute_metrics) | face (evaluation.face).
  train_visible: ImageSet
  train_infrared: ImageSet
  test_sets: dict
  directions: tuple
  extras: dict = dataclasses.field(default_factory=dict)  # e.g. "rand_perm_cam": SYSU's official permutations.
  validation: Optional["DataSource"] = None  # held-out training ids (config.data.num_val_ids > 0), protocol regdb.
  split: str = "test"  # what test_sets hold: "test" (the data set's test split) or "validation" (held-out ids).


BOTH_DIRECTIONS = (EvalDirection("visible_to_infrared", "visible", "infrared"),
                   EvalDirection("infrared_to_visible", "infrared", "visible"))
INFRARED_TO_VISIBLE = BOTH_DIRECTIONS[1:]
NIR_TO_VIS = (EvalDirection("nir_to_vis", "probe", "gallery"),)  # face: test sets probe_<fold>, gallery_<fold>.


ALL_PARTS = ("train", "test")
TEST_PART = ("test",)


def _empty(modality: int) -> ImageSet:
  return ImageSet((), (), (), modality)


def _source(name: str, protocol: str, sets: dict, infrared: str, directions: tuple) -> DataSource:
  """A DataSource from a reader's sets (keys train_/test_ + "visible" or `infrared`, the reader's IR name); train
  sets a test-only read left out are empty."""
  return DataSource(
      name=name, protocol=protocol,
      train_visible=sets.get("train_visible", _empty(VISIBLE)),
      train_infrared=sets.get(f"train_{infrared}", _empty(INFRARED)),
      test_sets={"visible": sets["test_visible"], "infrared": sets[f"test_{infrared}"]},
      directions=directions)


def _regdb_like(name: str, root: str, trial: int, parts: tuple = ALL_PARTS) -> DataSource:
  return _source(name, "regdb", regdb.read_regdb(root, trial, parts), "thermal", BOTH_DIRECTIONS)


def _sysu_source(root: str, parts: tuple = ALL_PARTS) -> DataSource:
  source = _source("sysu", "sysu", sysu.read_sysu(root, parts), "infrared", INFRARED_TO_VISIBLE)
  if sysu.has_rand_perm(root):
    source = dataclasses.replace(source, extras={"rand_perm_cam": sysu.read_rand_perm(root)})
  return source


# Prepared builder name -> (config.dataset, protocol, {set key: (split, modality)}, directions).
PREPARED = {
    "sysu_mm01": ("sysu", "sysu", {"train_visible": ("train", 0), "train_infrared": ("train", 1),
                                   "test_visible": ("test", 0), "test_infrared": ("test", 1)}, INFRARED_TO_VISIBLE),
    "regdb": ("regdb", "regdb", {"train_visible": ("train", 0), "train_infrared": ("train", 1),
                                 "test_visible": ("test_visible", 0), "test_infrared": ("test_thermal", 1)},
              BOTH_DIRECTIONS),
    "llcm": ("llcm", "llcm", {"train_visible": ("train", 0), "train_infrared": ("train", 1),
                              "test_visible": ("test_vis", 0), "test_infrared": ("test_nir", 1)}, BOTH_DIRECTIONS),
}


def _prepared_source(config: ml_collections.ConfigDict, parts: tuple = ALL_PARTS) -> DataSource:
  """The DataSource of the prepared folder config.data.data_dir (see the module docstring)."""
  data_dir = config.data.data_dir
  builder = {entry[0]: key for key, entry in PREPARED.items()}.get(config.dataset)
  if builder is not None:  # data_dir may also be prepare's --data_dir: find the data set's folder in it.
    data_dir = tfds_builders.find_prepared(data_dir, builder,
                                           f"split_{int(config.data.trial)}" if builder == "regdb" else None)
  wanted = None if parts == ALL_PARTS or builder is None else sorted(  # the splits to read (a test-only read).
      {split for key, (split, _) in PREPARED[builder][2].items() if key.split("_")[0] in parts})
  prepared = tfds_builders.read_prepared(data_dir, wanted)
  if prepared.name not in PREPARED:
    raise ConfigError(f"config.data.data_dir={config.data.data_dir} holds data set {prepared.name!r}, which has no "
                      f"registry entry: use one of {sorted(PREPARED)}.")
  name, protocol, keys, directions = PREPARED[prepared.name]
  if config.dataset != name:
    raise ConfigError(f"config.data.data_dir={config.data.data_dir} holds {prepared.name!r} but config.dataset is "
                      f"{config.dataset!r}: use --config=configs/{name}.py or point data_dir at a {name} set.")
  split = prepared.metadata.get("split")
  if name == "regdb" and split is not None and int(split) != int(config.data.trial):
    raise ConfigError(f"config.data.data_dir={config.data.data_dir} is RegDB split {split} but config.data.trial is "
                      f"{config.data.trial}: pass --config.data.trial={split} or the split_{config.data.trial} folder.")
  sets = {key: prepared.image_set(*where) for key, where in keys.items() if key.split("_")[0] in parts}
  extras = {"rand_perm_cam": prepared.metadata["rand_perm_cam"]} if prepared.metadata.get("rand_perm_cam") else {}
  return dataclasses.replace(_source(name, protocol, sets, "infrared", directions), extras=extras)


def hold_out_validation(source: DataSource, num_val_ids: int) -> DataSource:
  """Moves the last `num_val_ids` training identities (ascending ids present in both modalities) out of training
  into `source.validation`: a RegDB-style source (protocol regdb, both directions, whole sets, one trial).

  Raises:
    ValueError: num_val_ids < 0, or not fewer than the identities with both modalities (names the field).
  """
  if num_val_ids == 0:
    return source
  shared = np.intersect1d(source.train_visible.labels, source.train_infrared.labels)
  if num_val_ids < 0 or num_val_ids >= len(shared):
    raise ConfigError(f"config.data.num_val_ids={num_val_ids}: need 0 <= num_val_ids < {len(shared)} (the training "
                      "identities with visible and infrared images).")
  held = shared[-num_val_ids:]
  parts = {}
  for key, s in (("visible", source.train_visible), ("infrared", source.train_infrared)):
    out = np.isin(s.labels, held)
    parts[key] = (s.subset(np.flatnonzero(~out)), s.subset(np.flatnonzero(out)))
  validation = DataSource(name=f"{source.name}_validation", protocol="regdb", train_visible=parts["visible"][0],
                          train_infrared=parts["infrared"][0],
                          test_sets={"visible": parts["visible"][1], "infrared": parts["infrared"][1]},
                          directions=BOTH_DIRECTIONS, split="validation")
  return dataclasses.replace(source, train_visible=parts["visible"][0], train_infrared=parts["infrared"][0],
                             validation=validation)


def _casia_source(config: ml_collections.ConfigDict, parts: tuple = ALL_PARTS) -> DataSource:
  train_visible, train_infrared, test_sets = casia_builder.source_sets(config, test_only="train" not in parts)
  return DataSource(name="casia_nir_vis", protocol="face", train_visible=train_visible, train_infrared=train_infrared,
                    test_sets=test_sets, directions=NIR_TO_VIS)


def _llcm_source(root: str, parts: tuple = ALL_PARTS) -> DataSource:
  return _source("llcm", "llcm", llcm.read_llcm(root, parts), "infrared", BOTH_DIRECTIONS)


def model_selection_split(source: DataSource, config: ml_collections.ConfigDict) -> str:
  """The split the periodic evaluations (config.evals.every_steps) score, on which a checkpoint would be selected:
  "validation" when held-out ids exist (config.data.num_val_ids > 0) unless config.evals.select_on_test, else
  "test" (the paper's practice: no validation split)."""
  has_validation = source.validation is not None or source.split == "validation"
  return "validation" if has_validation and not config.evals.get("select_on_test", False) else "test"


def selection_split(source: DataSource, config: ml_collections.ConfigDict) -> Optional[str]:
  """The split whose periodic evaluations pick the best checkpoint (model selection), or None when nothing is
  selected: "validation" with held-out ids (config.data.num_val_ids > 0); "test" only when asked
  (config.evals.select_on_test: the paper's practice, not a held-out result); None without periodic evaluations
  (config.evals.every_steps = 0) or with neither."""
  if not config.evals.get("every_steps", 0):
    return None
  if config.evals.get("select_on_test", False):
    return "test"
  return "validation" if source.validation is not None or source.split == "validation" else None


def selection_source(source: DataSource, config: ml_collections.ConfigDict) -> DataSource:
  """The DataSource the periodic evaluations score (see `model_selection_split`)."""
  if model_selection_split(source, config) == "validation" and source.validation is not None:
    return source.validation
  return source


def synthetic_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the synthetic data set lives: config.data.root, or <workdir>/synthetic_data."""
  return config.data.root or os.path.join(workdir, "synthetic_data")


def load_source(config: ml_collections.ConfigDict, workdir: str) -> DataSource:
  """Reads (and for the synthetic set, first generates) the image lists of `config.dataset`, and checks every image
  read from a folder once (`check_images`).

  Raises:
    ValueError: unknown data set name, missing data root (regdb, sysu, llcm) or a malformed list file.
    FileNotFoundError: the data set's layout is incomplete (the message names the file).
    DataError: an empty, truncated or non-image file (named), without config.data.skip_corrupt.
  """
  source = check_images(_load(config, workdir), bool(config.data.get("skip_corrupt", False)))
  return hold_out_validation(source, int(config.data.get("num_val_ids", 0)))


def check_images(source: DataSource, skip_corrupt: bool = False) -> DataSource:
  """Checks the header of every image the source reads from files (`image_check.check_files`: size, signature,
  dimensions, length; not the pixels) and logs a counted summary. Prepared sets (ImageSet.encoded) were decoded
  by `prepare` and are not checked again.

  Returns:
    `source`, or with skip_corrupt the source without the unreadable images (train and test sets alike).
  Raises:
    DataError: unreadable images (the first ones named), unless skip_corrupt.
  """
  sets = {"train visible": source.train_visible, "train infrared": source.train_infrared,
          **{f"test {k}": v for k, v in source.test_sets.items()}}
  from_files = {k: v for k, v in sets.items() if v.encoded is None and len(v)}
  if not from_files:
    return source
  summary = image_check.check_files([p for s in from_files.values() for p in s.paths])
  what = f"{source.name} images ({', '.join(from_files)})"
  if summary.corrupt and not skip_corrupt:
    raise DataError(image_check.corrupt_message(summary.corrupt, "--config.data.skip_corrupt=true"))
  if not summary.corrupt:
    _log.info("%s", summary.describe(what))
    return source
  _log.warning("%s; left out (config.data.skip_corrupt).", summary.describe(what))
  bad = {c.path for c in summary.corrupt}

  def keep(s: ImageSet) -> ImageSet:
    if s.encoded is not None:
      return s
    return s.subset([i for i, p in enumerate(s.paths) if p not in bad])

  return dataclasses.replace(source, train_visible=keep(source.train_visible),
                             train_infrared=keep(source.train_infrared),
                             test_sets={k: keep(v) for k, v in source.test_sets.items()})


def load_test_source(config: ml_collections.ConfigDict, workdir: str) -> DataSource:
  """The test sets of `config.dataset` alone, for evaluation: no training list or image is read (the train sets
  are empty, no validation ids are held out), so a copy of the data set without its training part evaluates.

  The synthetic set is generated under the workdir if it is not there yet (as training does); a prepared folder
  (config.data.data_dir) reads only its test splits. Its images are header-checked as `load_source` does.
  Raises: as `load_source`, for the test part's files.
  """
  return check_images(_load(config, workdir, TEST_PART), bool(config.data.get("skip_corrupt", False)))


def _load(config: ml_collections.ConfigDict, workdir: str, parts: tuple = ALL_PARTS) -> DataSource:
  name = config.dataset
  if name == "casia_nir_vis":
    return _casia_source(config, parts)
  if config.data.get("data_dir"):
    return _prepared_source(config, parts)
  if name == "synthetic":
    s = config.synthetic
    root = synthetic.generate(
        synthetic_root(config, workdir), num_train_ids=s.num_train_ids, num_test_ids=s.num_test_ids,
        images_per_id=s.images_per_id, num_cameras=s.num_cameras, height=s.height, width=s.width,
        seed=s.seed)
    return _regdb_like("synthetic", root, config.data.trial, parts)
  if name == "regdb":
    if not config.data.root:
      raise ConfigError("config.dataset='regdb' needs the downloaded RegDB folder: "
                        "pass --config.data.root=/path/to/RegDB (it holds Visible/, Thermal/, idx/).")
    return _regdb_like("regdb", config.data.root, config.data.trial, parts)
  if name == "sysu":
    if not config.data.root:
      raise ConfigError("config.dataset='sysu' needs the downloaded SYSU-MM01 folder: "
                        "pass --config.data.root=/path/to/SYSU-MM01 (it holds cam1/ .. cam6/, exp/).")
    return _sysu_source(config.data.root, parts)
  if name == "llcm":
    if not config.data.root:
      raise ConfigError("config.dataset='llcm' needs the downloaded LLCM folder: "
                        "pass --config.data.root=/path/to/LLCM (it holds idx/, vis/, nir/, test_vis/, test_nir/).")
    return _llcm_source(config.data.root, parts)
  raise ConfigError(f"config.dataset={name!r} is unknown: use one of {', '.join(KNOWN_DATASETS)}.")
