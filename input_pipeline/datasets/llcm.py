"""Reader of LLCM's on-disk layout (FDNM_SPEC.md §5).

  <root>/idx/train_vis.txt, train_nir.txt   lines "<path relative to root> <label>" (images under vis/, nir/)
  <root>/idx/test_id.txt                    one line of comma-separated person ids
  <root>/test_vis/cam1 .. cam9/<pid:04d>/*
  <root>/test_nir/cam1, cam2, cam4 .. cam9/<pid:04d>/*

Training lists: read as DEEN's `data_loader.load_data` reads them (ZYK100/LLCM DEEN/data_loader.py, `LLCMData`):
each line is split on " " into a path, read as data folder + path (so relative to the root), and an int label
kept as written. Here a line must have exactly these two whitespace-separated fields (DEEN ignores anything after
the label), every listed image must exist, and the labels are kept as written (the input pipeline numbers the
training identities 0..N-1 itself). Training cameras: the number of the last `cam<c>/` folder of the listed path, or
0 when the path has none (0 = unknown; no protocol reads training cameras).

Test sets: as DEEN's `process_query_llcm` / `process_gallery_llcm` list them: the identities of test_id.txt
ascending, cameras ascending, the files of one (identity, camera) folder sorted by path (names starting with "."
skipped); person id and camera are those of the folder `<test_vis|test_nir>/cam<c>/<pid:04d>/` (DEEN parses them
from the text after the first "cam" of the full path, which breaks when the data folder's own path contains "cam").
A test identity found in no camera folder is counted and reported in one logging warning; the reader goes on.
"""

import logging
import os
import re
from typing import Mapping, Sequence

from fdnm_jax.errors import MissingFileError
from input_pipeline.datasets import folders
from input_pipeline.datasets.folders import image_set_counts, read_id_file
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

TEST_FOLDERS = {"visible": ("test_vis", (1, 2, 3, 4, 5, 6, 7, 8, 9)),
                "infrared": ("test_nir", (1, 2, 4, 5, 6, 7, 8, 9))}
TRAIN_LISTS = {"visible": "idx/train_vis.txt", "infrared": "idx/train_nir.txt"}
TEST_ID_FILE = "idx/test_id.txt"
UNKNOWN_CAMERA = 0  # camera of a training image whose path has no cam<c>/ folder.
PUBLISHED_COUNTS = folders.PUBLISHED_COUNTS["LLCM"]
compare_with_published = folders.compare_with_published  # compare_with_published("LLCM", llcm_counts(sets))
_LAYOUT = """expected the LLCM layout (FDNM_SPEC.md §5; the data set as downloaded):
  <root>/
    idx/train_vis.txt  idx/train_nir.txt   lines '<path relative to root> <label>'
    idx/test_id.txt                        one line of comma-separated person ids
    vis/ nir/                              the training images the lists name
    test_vis/cam1/ .. cam9/                each <pid:04d>/<image>
    test_nir/cam1/ cam2/ cam4/ .. cam9/    each <pid:04d>/<image>"""
_CAMERA_FOLDER = re.compile(r"(?:^|/)cam(\d+)/")
_log = logging.getLogger(__name__)


def camera_of(rel_path: str) -> int:
  """Camera of a path relative to the root: the number of its last `cam<c>/` folder, else UNKNOWN_CAMERA (0)."""
  matches = _CAMERA_FOLDER.findall(rel_path.replace(os.sep, "/"))
  return int(matches[-1]) if matches else UNKNOWN_CAMERA


def read_llcm(root: str, parts: Sequence[str] = ("train", "test")) -> dict[str, ImageSet]:
  """The train and test image lists of LLCM (or those of `parts` only).

  Args:
    root: the LLCM folder (holding idx/, vis/, nir/, test_vis/, test_nir/).
    parts: which lists to read: ("test",) needs only idx/test_id.txt, test_vis/ and test_nir/ (a copy of the data
      set without its training part evaluates).
  Returns:
    {"train_visible", "train_infrared", "test_visible", "test_infrared"} -> ImageSet with absolute paths,
    labels (train: the list files' labels; test: the person ids), cameras (see the module docstring) and
    modality 0 (visible) or 1 (near-infrared).
  Raises:
    FileNotFoundError: the root, a list file, a test camera folder or a listed training image is missing (names
      it, shows the layout).
    ValueError: a malformed list line (names the file and line) or a malformed test_id.txt (names it).
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise MissingFileError(f"LLCM folder {root} not found: {_LAYOUT}\nSet config.data.root to it.")
  for rel in (*(TRAIN_LISTS.values() if "train" in parts else ()), TEST_ID_FILE):
    if not os.path.isfile(os.path.join(root, rel)):
      raise MissingFileError(f"LLCM list file {rel} not found under {root}: {_LAYOUT}")
  for folder, cameras in TEST_FOLDERS.values():
    for cam in cameras:
      if not os.path.isdir(os.path.join(root, folder, f"cam{cam}")):
        raise MissingFileError(f"LLCM test camera folder {folder}/cam{cam}/ not found under {root}: {_LAYOUT}")
  sets = {}
  for kind, modality in (("visible", VISIBLE), ("infrared", INFRARED)):
    if "train" in parts:
      sets[f"train_{kind}"] = folders.read_list_file(root, TRAIN_LISTS[kind], modality, "LLCM", _LAYOUT, camera_of)
  test_ids = sorted(read_id_file(os.path.join(root, TEST_ID_FILE), "LLCM id file"))
  found = set()
  for kind, modality in (("visible", VISIBLE), ("infrared", INFRARED)):
    folder, cameras = TEST_FOLDERS[kind]
    sets[f"test_{kind}"] = folders.read_camera_folders(os.path.join(root, folder), test_ids, cameras, modality, found)
  missing = [i for i in test_ids if i not in found]
  if missing:
    _log.warning("LLCM under %s: %d of %d test identities of %s have no image in any camera folder of test_vis/ "
                 "or test_nir/ (%s); they are left out. Compare the counts with compare_with_published.",
                 root, len(missing), len(test_ids), TEST_ID_FILE, missing[:10])
  return sets


def llcm_counts(sets: Mapping[str, ImageSet]) -> dict[str, int]:
  """The counts of `read_llcm`'s sets, keys as PUBLISHED_COUNTS: compare them with
  `compare_with_published("LLCM", counts)`."""
  return image_set_counts(sets)
