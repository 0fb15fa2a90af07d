"""`sources.load_test_source`: a copy of each data set without its training part gives the same test sets as the
full download read by `load_source` (and the full read fails on that copy: the training part really is gone)."""

import os
import shutil

import ml_collections
import numpy as np
import pytest

from input_pipeline import sources
from input_pipeline.datasets import synthetic
from tests.input_pipeline import test_llcm, test_sysu


def _config(dataset, root):
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.data = ml_collections.ConfigDict({"root": root, "trial": 1, "num_val_ids": 0, "data_dir": ""})
  config.synthetic = ml_collections.ConfigDict({"num_train_ids": 3, "num_test_ids": 2, "images_per_id": 2,
                                                "num_cameras": 2, "height": 16, "width": 8, "seed": 0})
  return config


def _relative(image_set, root):
  return [os.path.relpath(p, root) for p in image_set.paths]


def _assert_same_test_sets(got, want, got_root, want_root):
  assert set(got.test_sets) == set(want.test_sets) and got.directions == want.directions
  assert got.protocol == want.protocol and got.name == want.name
  for name, w in want.test_sets.items():
    g = got.test_sets[name]
    assert _relative(g, got_root) == _relative(w, want_root), name
    np.testing.assert_array_equal(g.labels, w.labels)
    np.testing.assert_array_equal(g.cameras, w.cameras)
    assert g.modality == w.modality
  assert len(got.train_visible) == len(got.train_infrared) == 0 and got.validation is None


def test_sysu_without_its_training_part(tmp_path):
  full = test_sysu.write_tree(tmp_path / "full")
  copy = str(tmp_path / "test_only")
  shutil.copytree(full, copy)
  for rel in ("exp/train_id.txt", "exp/val_id.txt"):
    os.remove(os.path.join(copy, rel))
  for pid in test_sysu.TRAIN_IDS + test_sysu.VAL_IDS:
    for cam in range(1, 7):
      shutil.rmtree(os.path.join(copy, f"cam{cam}", f"{pid:04d}"), ignore_errors=True)
  with pytest.raises(FileNotFoundError, match="exp/train_id.txt"):
    sources.load_source(_config("sysu", copy), str(tmp_path / "w"))
  want = sources.load_source(_config("sysu", full), str(tmp_path / "w"))
  _assert_same_test_sets(sources.load_test_source(_config("sysu", copy), str(tmp_path / "w")), want, copy, full)


def test_llcm_without_its_training_part(tmp_path):
  full = test_llcm.write_tree(tmp_path / "full")
  copy = str(tmp_path / "test_only")
  shutil.copytree(full, copy)
  for rel in ("idx/train_vis.txt", "idx/train_nir.txt"):
    os.remove(os.path.join(copy, rel))
  shutil.rmtree(os.path.join(copy, "vis"))
  shutil.rmtree(os.path.join(copy, "nir"))
  with pytest.raises(FileNotFoundError, match="idx/train_vis.txt"):
    sources.load_source(_config("llcm", copy), str(tmp_path / "w"))
  want = sources.load_source(_config("llcm", full), str(tmp_path / "w"))
  _assert_same_test_sets(sources.load_test_source(_config("llcm", copy), str(tmp_path / "w")), want, copy, full)


@pytest.mark.parametrize("dataset", ["regdb", "synthetic"])
def test_regdb_layout_without_its_training_part(tmp_path, dataset):
  config = _config(dataset, str(tmp_path / "full"))
  s = config.synthetic
  full = synthetic.generate(config.data.root, num_train_ids=s.num_train_ids, num_test_ids=s.num_test_ids,
                            images_per_id=s.images_per_id, num_cameras=s.num_cameras, height=s.height,
                            width=s.width, seed=s.seed)
  copy = str(tmp_path / "test_only")
  shutil.copytree(full, copy)
  _, test_pids = synthetic.split_identities(s.seed, s.num_train_ids, s.num_test_ids, 1)
  for name in os.listdir(os.path.join(copy, "idx")):
    if not name.endswith("_1.txt") or name.startswith("train_"):  # keep split 1's test lists only.
      os.remove(os.path.join(copy, "idx", name))
  for folder in ("Visible", "Thermal"):
    for pid in os.listdir(os.path.join(copy, folder)):
      if int(pid) not in test_pids:
        shutil.rmtree(os.path.join(copy, folder, pid))
  with pytest.raises(FileNotFoundError, match="idx/train_visible_1.txt"):
    sources.load_source(_config(dataset, copy), str(tmp_path / "w"))
  want = sources.load_source(config, str(tmp_path / "w"))
  _assert_same_test_sets(sources.load_test_source(_config(dataset, copy), str(tmp_path / "w")), want, copy, full)
