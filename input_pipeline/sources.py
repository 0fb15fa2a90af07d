"""Which image sets a config trains and evaluates on: the data-set registry.

Knows nothing of JAX. Each data set gives its train visible/infrared sets, its test sets
and the evaluation directions (query set, gallery set) with the protocol that scores them:
  - synthetic, regdb: protocol "regdb"; test sets "visible", "infrared" of split config.data.trial; both directions.
  - sysu: protocol "sysu"; test sets "visible" (RGB cams 1, 2, 4, 5) and "infrared" (IR cams 3, 6) of the test
    identities; one direction, infrared -> visible (the gallery is sampled per trial, fdnm_jax.evaluation.protocols).
  - llcm: protocol "llcm"; test sets "visible" (test_vis, cams 1..9) and "infrared" (test_nir, cams 1, 2, 4..9);
    both directions.
sysu, llcm and regdb read config.data.root (the data set as downloaded, FDNM_SPEC.md §5); synthetic generates its set.
"""

import dataclasses
import os

import ml_collections

from input_pipeline.datasets import llcm, regdb, synthetic, sysu
from input_pipeline.datasets.image_set import ImageSet

KNOWN_DATASETS = ("synthetic", "regdb", "sysu", "llcm")


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
  protocol: str  # evaluation protocol of compute_metrics: sysu | regdb | llcm.
  train_visible: ImageSet
  train_infrared: ImageSet
  test_sets: dict
  directions: tuple


BOTH_DIRECTIONS = (EvalDirection("visible_to_infrared", "visible", "infrared"),
                   EvalDirection("infrared_to_visible", "infrared", "visible"))
INFRARED_TO_VISIBLE = BOTH_DIRECTIONS[1:]


def _source(name: str, protocol: str, sets: dict, infrared: str, directions: tuple) -> DataSource:
  """A DataSource from a reader's sets (keys train_/test_ + "visible" or `infrared`, the reader's IR name)."""
  return DataSource(
      name=name, protocol=protocol,
      train_visible=sets["train_visible"], train_infrared=sets[f"train_{infrared}"],
      test_sets={"visible": sets["test_visible"], "infrared": sets[f"test_{infrared}"]},
      directions=directions)


def _regdb_like(name: str, root: str, trial: int) -> DataSource:
  return _source(name, "regdb", regdb.read_regdb(root, trial), "thermal", BOTH_DIRECTIONS)


def _sysu_source(root: str) -> DataSource:
  return _source("sysu", "sysu", sysu.read_sysu(root), "infrared", INFRARED_TO_VISIBLE)


def _llcm_source(root: str) -> DataSource:
  return _source("llcm", "llcm", llcm.read_llcm(root), "infrared", BOTH_DIRECTIONS)


def synthetic_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the synthetic data set lives: config.data.root, or <workdir>/synthetic_data."""
  return config.data.root or os.path.join(workdir, "synthetic_data")


def load_source(config: ml_collections.ConfigDict, workdir: str) -> DataSource:
  """Reads (and for the synthetic set, first generates) the image lists of `config.dataset`.

  Raises:
    ValueError: unknown data set name, missing data root (regdb, sysu, llcm) or a malformed list file.
    FileNotFoundError: the data set's layout is incomplete (the message names the file).
  """
  name = config.dataset
  if name == "synthetic":
    s = config.synthetic
    root = synthetic.generate(
        synthetic_root(config, workdir), num_train_ids=s.num_train_ids, num_test_ids=s.num_test_ids,
        images_per_id=s.images_per_id, num_cameras=s.num_cameras, height=s.height, width=s.width,
        seed=s.seed)
    return _regdb_like("synthetic", root, config.data.trial)
  if name == "regdb":
    if not config.data.root:
      raise ValueError("config.dataset='regdb' needs the downloaded RegDB folder: "
                       "pass --config.data.root=/path/to/RegDB (it holds Visible/, Thermal/, idx/).")
    return _regdb_like("regdb", config.data.root, config.data.trial)
  if name == "sysu":
    if not config.data.root:
      raise ValueError("config.dataset='sysu' needs the downloaded SYSU-MM01 folder: "
                       "pass --config.data.root=/path/to/SYSU-MM01 (it holds cam1/ .. cam6/, exp/).")
    return _sysu_source(config.data.root)
  if name == "llcm":
    if not config.data.root:
      raise ValueError("config.dataset='llcm' needs the downloaded LLCM folder: "
                       "pass --config.data.root=/path/to/LLCM (it holds idx/, vis/, nir/, test_vis/, test_nir/).")
    return _llcm_source(config.data.root)
  raise ValueError(f"config.dataset={name!r} is unknown: use one of {', '.join(KNOWN_DATASETS)}.")
