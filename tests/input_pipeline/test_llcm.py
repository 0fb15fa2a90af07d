"""read_llcm on a small LLCM tree (real tiny JPEGs in the exact layout), its errors, counts, and the DataSource."""

import logging
import os
import shutil

import pytest
from PIL import Image

from input_pipeline.datasets import llcm
from input_pipeline.datasets.image_set import INFRARED, VISIBLE

# Training lists: (relative path, label) in file order (not sorted: the reader keeps the list order).
TRAIN_VIS = (("vis/cam2/0004/v_0004_c2_02.jpg", 1), ("vis/cam2/0004/v_0004_c2_01.jpg", 1),
             ("vis/cam7/0001/v_0001_c7_01.jpg", 0), ("vis/0009/v_0009_03.jpg", 2))  # no cam folder: camera 0
TRAIN_NIR = (("nir/cam4/0001/n_0001_c4_01.jpg", 0), ("nir/cam12/0009/n_0009_c12_01.jpg", 2),
             ("nir/0004/n_0004_01.jpg", 1))
TEST_IDS = (30, 11, 42)  # 42 has no image in any test camera
# Test images per (folder, camera, id); missing = no folder.
TEST_COUNTS = {("test_vis", 1, 11): 2, ("test_vis", 9, 11): 1, ("test_vis", 3, 30): 3, ("test_vis", 5, 30): 1,
               ("test_nir", 2, 11): 1, ("test_nir", 8, 30): 2, ("test_nir", 4, 30): 1}
NAMES = ("b.jpg", "a.jpg", "c.jpg")  # unsorted on purpose
CAMERAS = {"test_vis": (1, 2, 3, 4, 5, 6, 7, 8, 9), "test_nir": (1, 2, 4, 5, 6, 7, 8, 9)}


def _jpeg(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (4, 8), (10, 20, 30)).save(path)


def write_tree(root) -> str:
  root = str(root)
  os.makedirs(os.path.join(root, "idx"))
  for name, rows in (("train_vis", TRAIN_VIS), ("train_nir", TRAIN_NIR)):
    with open(os.path.join(root, "idx", f"{name}.txt"), "w") as f:
      for rel, label in rows:
        _jpeg(os.path.join(root, rel))
        f.write(f"{rel} {label}\n")
  with open(os.path.join(root, "idx", "test_id.txt"), "w") as f:
    f.write(",".join(str(i) for i in TEST_IDS))
  for folder, cams in CAMERAS.items():
    for cam in cams:
      os.makedirs(os.path.join(root, folder, f"cam{cam}"))
  for (folder, cam, pid), count in TEST_COUNTS.items():
    for name in NAMES[:count]:
      _jpeg(os.path.join(root, folder, f"cam{cam}", f"{pid:04d}", name))
  return root


def _expected_test(folder):
  rows = []
  for pid in sorted(TEST_IDS):
    for cam in CAMERAS[folder]:
      for name in sorted(NAMES[:TEST_COUNTS.get((folder, cam, pid), 0)]):
        rows.append((f"{folder}/cam{cam}/{pid:04d}/{name}", pid, cam))
  return rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_tree(tmp_path_factory.mktemp("LLCM"))


def test_sets_follow_the_layout(tree):
  sets = llcm.read_llcm(tree)
  assert set(sets) == {"train_visible", "train_infrared", "test_visible", "test_infrared"}
  for key, rows, cams in (("train_visible", TRAIN_VIS, [2, 2, 7, 0]), ("train_infrared", TRAIN_NIR, [4, 12, 0])):
    s = sets[key]
    assert list(s.paths) == [os.path.join(tree, rel) for rel, _ in rows]
    assert s.labels.tolist() == [label for _, label in rows]
    assert s.cameras.tolist() == cams
  for key, folder in (("test_visible", "test_vis"), ("test_infrared", "test_nir")):
    s, rows = sets[key], _expected_test(folder)
    assert list(s.paths) == [os.path.join(tree, r[0]) for r in rows]
    assert s.labels.tolist() == [r[1] for r in rows]
    assert s.cameras.tolist() == [r[2] for r in rows]
  assert [sets[k].modality for k in ("train_visible", "train_infrared", "test_visible", "test_infrared")] == [
      VISIBLE, INFRARED, VISIBLE, INFRARED]


def test_camera_of_parses_the_last_cam_folder():
  assert llcm.camera_of("test_nir/cam8/0030/a.jpg") == 8
  assert llcm.camera_of("nir/cam12/0009/x.jpg") == 12
  assert llcm.camera_of("vis/0009/cam3.jpg") == 0  # a file name is not a camera folder
  assert llcm.camera_of("vis/0009/x.jpg") == llcm.UNKNOWN_CAMERA == 0


def test_data_folder_named_cam_does_not_confuse_the_parse(tmp_path):
  root = write_tree(tmp_path / "camera_data" / "cam5")
  sets = llcm.read_llcm(root)
  assert sets["test_infrared"].cameras.tolist() == [r[2] for r in _expected_test("test_nir")]
  assert sets["train_visible"].cameras.tolist() == [2, 2, 7, 0]


def test_missing_test_identity_is_warned_and_counts_compare(tree, caplog):
  with caplog.at_level(logging.WARNING, logger=llcm.__name__):
    sets = llcm.read_llcm(tree)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "1 of 3 test identities" in warnings[0] and "[42]" in warnings[0]
  counts = llcm.llcm_counts(sets)
  assert counts == {"train_ids": 3, "train_visible_images": 4, "train_infrared_images": 3, "test_ids": 2,
                    "test_visible_images": 7, "test_infrared_images": 4}
  assert llcm.compare_with_published("LLCM", counts) == ["LLCM: train_ids = 3, published 713 (-710)",
                                                         "LLCM: test_ids = 2, published 351 (-349)"]
  assert llcm.compare_with_published("LLCM", {"train_ids": 713, "test_ids": 351}) == []


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)LLCM folder .*nowhere not found.*idx/train_vis.txt"):
    llcm.read_llcm(str(tmp_path / "nowhere"))
  root = write_tree(tmp_path / "a")
  os.remove(os.path.join(root, "idx", "train_nir.txt"))
  with pytest.raises(FileNotFoundError) as e:
    llcm.read_llcm(root)
  assert f"LLCM list file idx/train_nir.txt not found under {root}" in str(e.value)
  assert "test_nir/cam1/ cam2/ cam4/ .. cam9/" in str(e.value)  # the expected tree
  root = write_tree(tmp_path / "b")
  shutil.rmtree(os.path.join(root, "test_nir", "cam6"))
  with pytest.raises(FileNotFoundError, match=r"test camera folder test_nir/cam6/ not found under"):
    llcm.read_llcm(root)
  root = write_tree(tmp_path / "c")
  os.remove(os.path.join(root, TRAIN_NIR[1][0]))
  with pytest.raises(FileNotFoundError, match=r"LLCM image nir/cam12/0009/n_0009_c12_01.jpg \(listed in "
                                              r"idx/train_nir.txt, line 2\) not found"):
    llcm.read_llcm(root)


@pytest.mark.parametrize("line", ["vis/cam2/0004/v_0004_c2_01.jpg", "vis/cam2/0004/v_0004_c2_01.jpg one",
                                  "vis/cam2/0004/v_0004_c2_01.jpg 1 extra"])
def test_malformed_list_line_names_file_and_line(tmp_path, line):
  root = write_tree(tmp_path)
  path = os.path.join(root, "idx", "train_vis.txt")
  with open(path, "a") as f:
    f.write("\n" + line + "\n")
  with pytest.raises(ValueError) as e:
    llcm.read_llcm(root)
  assert f"{path}, line 6" in str(e.value) and repr(line) in str(e.value)


def test_malformed_test_id_file_names_it(tmp_path):
  root = write_tree(tmp_path)
  path = os.path.join(root, "idx", "test_id.txt")
  with open(path, "w") as f:
    f.write("11;30")
  with pytest.raises(ValueError, match=r"LLCM id file .*test_id\.txt: '11;30' is not a non-negative integer"):
    llcm.read_llcm(root)
