"""load_source for sysu and llcm: the protocol contract of fdnm_jax.evaluation.protocols, and the no-root message.

Needs input_pipeline/sources.py's sysu/llcm DataSources (committed together with tests/test_train.py's new
no-root expected strings)."""

import os

import ml_collections
import pytest

from fdnm_jax.evaluation import protocols
from input_pipeline import sources
from input_pipeline.datasets import sysu
from input_pipeline.datasets.image_set import INFRARED
from tests.input_pipeline import test_llcm, test_sysu


def _config(dataset, root):
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.data = ml_collections.ConfigDict({"root": root, "trial": 1})
  return config


def test_sysu_source_gives_the_protocol_contract(tmp_path):
  tree = test_sysu.write_tree(tmp_path / "data")
  source = sources.load_source(_config("sysu", tree), str(tmp_path / "w"))
  assert source.name == "sysu" and source.protocol == "sysu"
  sets = sysu.read_sysu(tree)
  assert source.train_visible.paths == sets["train_visible"].paths
  assert source.train_infrared.paths == sets["train_infrared"].paths
  assert set(source.test_sets) == {"visible", "infrared"}
  assert source.test_sets["visible"].paths == sets["test_visible"].paths
  assert set(source.test_sets["visible"].cameras.tolist()) <= {1, 2, 4, 5}
  assert set(source.test_sets["infrared"].cameras.tolist()) == {3, 6}
  assert source.test_sets["infrared"].modality == INFRARED
  assert source.directions == (sources.EvalDirection("infrared_to_visible", "infrared", "visible"),)
  settings = protocols.settings_for(source, _config("sysu", tree))
  assert len(settings) == 4
  assert {(s.query, s.gallery, s.protocol) for s in settings} == {("infrared", "visible", "sysu")}
  assert sorted((s.gallery_cameras, s.shot) for s in settings) == [((1, 2), 1), ((1, 2), 10), ((1, 2, 4, 5), 1),
                                                                    ((1, 2, 4, 5), 10)]
  assert all(s.query_cameras == (3, 6) and len(s.trials) == 10 for s in settings)


def test_sysu_without_root_says_how_to_pass_it(tmp_path):
  with pytest.raises(ValueError, match="--config.data.root=/path/to/SYSU-MM01"):
    sources.load_source(_config("sysu", ""), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="SYSU-MM01 folder"):
    sources.load_source(_config("sysu", str(tmp_path / "missing")), str(tmp_path / "w"))


def test_llcm_source_gives_the_protocol_contract(tmp_path):
  tree = test_llcm.write_tree(tmp_path / "data")
  source = sources.load_source(_config("llcm", tree), str(tmp_path / "w"))
  assert source.name == "llcm" and source.protocol == "llcm"
  assert list(source.train_visible.paths) == [os.path.join(tree, rel) for rel, _ in test_llcm.TRAIN_VIS]
  assert set(source.test_sets) == {"visible", "infrared"}
  assert source.test_sets["visible"].paths[0].startswith(os.path.join(tree, "test_vis", ""))
  assert source.test_sets["infrared"].paths[0].startswith(os.path.join(tree, "test_nir", ""))
  assert source.directions == (sources.EvalDirection("visible_to_infrared", "visible", "infrared"),
                               sources.EvalDirection("infrared_to_visible", "infrared", "visible"))
  settings = protocols.settings_for(source, _config("llcm", tree))
  assert [(s.query, s.gallery, s.protocol, len(s.trials)) for s in settings] == [
      ("visible", "infrared", "llcm", 10), ("infrared", "visible", "llcm", 10)]


def test_llcm_without_root_says_how_to_pass_it(tmp_path):
  with pytest.raises(ValueError, match="--config.data.root=/path/to/LLCM"):
    sources.load_source(_config("llcm", ""), str(tmp_path / "w"))
