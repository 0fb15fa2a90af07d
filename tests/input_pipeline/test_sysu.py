"""read_sysu on a small SYSU-MM01 tree (real tiny JPEGs in the exact layout), its errors, counts, and the DataSource."""

import logging
import os
import shutil

import pytest
from PIL import Image

from input_pipeline.datasets import folders, sysu
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

TRAIN_IDS = (3, 1)  # exp/train_id.txt (unsorted: the reader sorts)
VAL_IDS = (8,)  # exp/val_id.txt: trained on too
TEST_IDS = (12, 5, 20)  # exp/test_id.txt; 20 has no folder in any camera
ABSENT = (20,)
# Images per (id, camera); an id missing from the table has no folder in that camera.
COUNTS = {
    1: {1: 2, 2: 1, 3: 2, 4: 1, 6: 1},  # no cam5
    3: {1: 1, 3: 1},  # one RGB and one IR camera only
    8: {2: 2, 4: 1, 5: 1, 6: 2},  # no cam1, no cam3
    12: {1: 1, 2: 2, 3: 3, 5: 1, 6: 1},
    5: {4: 2, 6: 2},  # only outdoor cameras
}
IMAGE_NAMES = ("0007", "0002", "0010")  # unsorted on purpose


def write_tree(root) -> str:
  """The fixture tree; returns root. Also one extra stray file (.DS_Store) that must be skipped."""
  root = str(root)
  for cam in range(1, 7):
    os.makedirs(os.path.join(root, f"cam{cam}"))
  for pid, per_cam in COUNTS.items():
    for cam, count in per_cam.items():
      folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
      os.makedirs(folder)
      for name in IMAGE_NAMES[:count]:
        Image.new("RGB", (4, 8), (pid, cam, 0)).save(os.path.join(folder, f"{name}.jpg"))
  open(os.path.join(root, "cam1", "0001", ".DS_Store"), "w").close()
  os.makedirs(os.path.join(root, "exp"))
  for name, ids in (("train_id", TRAIN_IDS), ("val_id", VAL_IDS), ("test_id", TEST_IDS)):
    with open(os.path.join(root, "exp", f"{name}.txt"), "w") as f:
      f.write(",".join(str(i) for i in ids) + "\n")
  return root


def _expected(ids, cameras):
  """(relative paths, ids, cameras) in AGW's order: ids ascending, cameras as given, names sorted."""
  rows = []
  for pid in sorted(ids):
    for cam in cameras:
      for name in sorted(IMAGE_NAMES[:COUNTS.get(pid, {}).get(cam, 0)]):
        rows.append((f"cam{cam}/{pid:04d}/{name}.jpg", pid, cam))
  return rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return write_tree(tmp_path_factory.mktemp("SYSU-MM01"))


def test_sets_follow_the_layout(tree):
  sets = sysu.read_sysu(tree)
  assert set(sets) == {"train_visible", "train_infrared", "test_visible", "test_infrared"}
  for key, ids in (("train", TRAIN_IDS + VAL_IDS), ("test", TEST_IDS)):
    for kind, cameras, modality in (("visible", (1, 2, 4, 5), VISIBLE), ("infrared", (3, 6), INFRARED)):
      s = sets[f"{key}_{kind}"]
      assert isinstance(s, ImageSet) and s.modality == modality
      rows = _expected(ids, cameras)
      assert list(s.paths) == [os.path.join(tree, r[0]) for r in rows], f"{key}_{kind}"
      assert s.labels.tolist() == [r[1] for r in rows]
      assert s.cameras.tolist() == [r[2] for r in rows]
      assert all(os.path.isabs(p) and p.endswith(".jpg") for p in s.paths)
  assert sets["train_visible"].labels.tolist().count(8) == 4  # val ids are training ids
  assert not set(sets["train_visible"].labels.tolist()) & set(sets["test_visible"].labels.tolist())


def test_identity_in_no_camera_is_warned_about_and_left_out(tree, caplog):
  with caplog.at_level(logging.WARNING, logger=sysu.__name__):
    sets = sysu.read_sysu(tree)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  assert "0 of 3 training and 1 of 3 test identities" in warnings[0] and "[20]" in warnings[0]
  assert 20 not in sets["test_visible"].labels.tolist() + sets["test_infrared"].labels.tolist()


def test_counts_and_comparison_with_published(tree):
  counts = sysu.sysu_counts(sysu.read_sysu(tree))
  n = lambda ids, cams: len(_expected(ids, cams))  # noqa: E731
  assert counts == {"train_ids": 3, "train_visible_images": n((1, 3, 8), (1, 2, 4, 5)),
                    "train_infrared_images": n((1, 3, 8), (3, 6)), "test_ids": 2,
                    "test_visible_images": n((5, 12), (1, 2, 4, 5)), "test_infrared_images": n((5, 12), (3, 6))}
  diffs = sysu.compare_with_published("SYSU-MM01", counts)
  assert len(diffs) == 5 and "train_ids = 3, published 395 (-392)" in diffs[0]
  published = dict(sysu.PUBLISHED_COUNTS, test_visible_images=7)
  assert sysu.compare_with_published("SYSU-MM01", published) == []
  assert sysu.compare_with_published("SYSU-MM01", dict(published, test_ids=95)) == [
      "SYSU-MM01: test_ids = 95, published 96 (-1)"]
  assert folders.compare_with_published("x", {"a": 1}, {"a": 1, "b": 2}) == ["x: b not counted (published 2)"]
  with pytest.raises(ValueError, match="no published counts"):
    folders.compare_with_published("Market", counts)


def test_missing_root_id_file_and_camera_folder_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)SYSU-MM01 folder .*nowhere not found.*exp/train_id.txt"):
    sysu.read_sysu(str(tmp_path / "nowhere"))
  root = write_tree(tmp_path / "a")
  os.remove(os.path.join(root, "exp", "val_id.txt"))
  with pytest.raises(FileNotFoundError) as e:
    sysu.read_sysu(root)
  assert f"SYSU-MM01 id file exp/val_id.txt not found under {root}" in str(e.value)
  assert "cam1/ cam2/ cam3/ cam4/ cam5/ cam6/" in str(e.value)  # the expected tree
  root = write_tree(tmp_path / "b")
  shutil.rmtree(os.path.join(root, "cam4"))
  shutil.rmtree(os.path.join(root, "cam5"))
  with pytest.raises(FileNotFoundError, match=r"(?s)camera folder cam4/ not found under .*expected the SYSU-MM01"):
    sysu.read_sysu(root)


@pytest.mark.parametrize("text, words", [("", "got 0 non-empty lines"), ("1,2\n3\n", "got 2 non-empty lines"),
                                         ("1,x,3", "'x' is not a non-negative integer"),
                                         ("1,,3", "'' is not a non-negative integer"),
                                         ("1 2", "'1 2' is not"), ("4,1,4", "[4] are listed more than once")])
def test_malformed_id_file_names_the_file(tmp_path, text, words):
  root = write_tree(tmp_path)
  path = os.path.join(root, "exp", "test_id.txt")
  with open(path, "w") as f:
    f.write(text)
  with pytest.raises(ValueError) as e:
    sysu.read_sysu(root)
  assert path in str(e.value) and words in str(e.value)


def test_id_file_tolerates_spaces_and_blank_lines(tmp_path):
  path = tmp_path / "ids.txt"
  path.write_text(" 5, 12 ,20\n\n")
  assert folders.read_id_file(str(path)) == [5, 12, 20]


def test_training_and_test_ids_must_not_overlap(tmp_path):
  root = write_tree(tmp_path)
  with open(os.path.join(root, "exp", "val_id.txt"), "w") as f:
    f.write("8,12")
  with pytest.raises(ValueError, match=r"person ids \[12\] are in both the training lists"):
    sysu.read_sysu(root)
