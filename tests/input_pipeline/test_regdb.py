"""read_regdb: contents on the synthetic set, RegDB-style names, and errors that name the problem."""

import os
import shutil

import numpy as np
import pytest

from input_pipeline.datasets import regdb
from input_pipeline.datasets.image_set import ImageSet


def _fake_regdb(root) -> str:
  """A two-identity RegDB tree with real-style file names (no camera prefix) and split 1 only."""
  lines = {}
  for pid, part in ((7, "train"), (9, "test")):
    for folder, kind, letter in (("Visible", "visible", "v"), ("Thermal", "thermal", "t")):
      os.makedirs(root / folder / str(pid))
      names = [f"{folder}/{pid}/male_back_{letter}_{n:05d}_{pid}.bmp" for n in (11, 12)]
      for name in names:
        (root / name).write_bytes(b"BM")
      lines[f"{part}_{kind}_1.txt"] = "".join(f"{name} 0\n" for name in names)
  os.makedirs(root / "idx")
  for name, text in lines.items():
    (root / "idx" / name).write_text(text)
  return str(root)


def test_reads_the_synthetic_set(tiny_root, tiny_params):
  sets = regdb.read_regdb(tiny_root, 2)
  assert set(sets) == {"train_visible", "train_thermal", "test_visible", "test_thermal"}
  n_img = tiny_params["images_per_id"]
  for key, s in sets.items():
    assert isinstance(s, ImageSet)
    part = key.split("_")[0]
    assert len(s) == tiny_params[f"num_{part}_ids"] * n_img
    assert s.labels.dtype == np.int32 and s.cameras.dtype == np.int32
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in s.paths)
    assert s.modality == (0 if key.endswith("visible") else 1)
    expected_cameras = [int(os.path.basename(p)[1]) for p in s.paths]  # c<cam>_ prefix
    assert s.cameras.tolist() == expected_cameras
    assert set(s.cameras.tolist()) == ({1, 2} if s.modality == 0 else {3, 4})
    with open(os.path.join(tiny_root, "idx", f"{key}_2.txt")) as f:
      assert s.labels.tolist() == [int(line.split()[1]) for line in f]
  assert not set(sets["train_visible"].paths) & set(sets["test_visible"].paths)


def test_real_regdb_names_get_cameras_1_and_2(tmp_path):
  sets = regdb.read_regdb(_fake_regdb(tmp_path), 1)
  assert sets["train_visible"].cameras.tolist() == [1, 1]
  assert sets["test_thermal"].cameras.tolist() == [2, 2]
  assert sets["test_thermal"].paths[0] == str(tmp_path / "Thermal/9/male_back_t_00011_9.bmp")


def test_missing_root_and_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="RegDB folder .*nowhere not found"):
    regdb.read_regdb(str(tmp_path / "nowhere"), 1)
  root = _fake_regdb(tmp_path)
  shutil.rmtree(os.path.join(root, "Thermal"))
  with pytest.raises(FileNotFoundError, match=r"Thermal/ not found under .*expected the layout Visible/"):
    regdb.read_regdb(root, 1)


def test_missing_split_file_is_named(tmp_path):
  root = _fake_regdb(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    regdb.read_regdb(root, 3)
  assert f"RegDB split file idx/train_visible_3.txt not found under {root}" in str(e.value)
  assert "Visible/" in str(e.value) and "idx/" in str(e.value)


def test_malformed_line_names_file_and_line(tmp_path):
  root = _fake_regdb(tmp_path)
  path = os.path.join(root, "idx", "test_visible_1.txt")
  with open(path, "a") as f:
    f.write("Visible/9/male_back_v_00011_9.bmp\n")
  with pytest.raises(ValueError, match=r"test_visible_1\.txt, line 3"):
    regdb.read_regdb(root, 1)
  with open(path, "w") as f:
    f.write("Visible/9/male_back_v_00011_9.bmp nine\n")
  with pytest.raises(ValueError, match=r"test_visible_1\.txt, line 1"):
    regdb.read_regdb(root, 1)


def test_missing_image_is_named(tmp_path):
  root = _fake_regdb(tmp_path)
  os.remove(os.path.join(root, "Visible/7/male_back_v_00012_7.bmp"))
  with pytest.raises(FileNotFoundError, match=r"Visible/7/male_back_v_00012_7\.bmp .*train_visible_1\.txt, line 2"):
    regdb.read_regdb(root, 1)


@pytest.mark.parametrize("trial", [0, 11, 1.0, True])
def test_trial_outside_1_to_10(tmp_path, trial):
  with pytest.raises(ValueError, match="trial"):
    regdb.read_regdb(_fake_regdb(tmp_path), trial)


def test_image_set_checks_lengths_and_freezes_arrays():
  s = ImageSet(paths=("/a", "/b"), labels=[3, 4], cameras=np.array([1, 1], np.int64), modality=1)
  assert len(s) == 2 and s.cameras.dtype == np.int32
  with pytest.raises(ValueError):
    s.labels[0] = 5
  with pytest.raises(ValueError, match="one label and one camera per path"):
    ImageSet(paths=("/a",), labels=[1, 2], cameras=[1], modality=0)
  with pytest.raises(ValueError, match="modality"):
    ImageSet(paths=(), labels=[], cameras=[], modality=2)
