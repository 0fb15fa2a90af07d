"""Reader of SYSU-MM01's on-disk layout (FDNM_SPEC.md §5).

  <root>/cam1 .. cam6/<pid:04d>/<img:04d>.jpg
  <root>/exp/train_id.txt, val_id.txt, test_id.txt   one line of comma-separated person ids

RGB cameras 1, 2 (indoor), 4, 5 (outdoor); IR cameras 3 (indoor), 6 (outdoor). As AGW's `pre_process_sysu.py`
does, the training identities are train_id + val_id (395), the test identities test_id (96).

Order (AGW's): identities ascending, then cameras in the order above (1, 2, 4, 5 or 3, 6), then the files of one
(identity, camera) folder sorted by path. Every file of a folder is an image, except names starting with "." (AGW
lists the whole folder). Labels are the person ids as written (not relabelled); cameras the camera number;
modality 0 (RGB) / 1 (IR). An identity folder missing from a camera is normal (real SYSU-MM01 has identities
seen by a few cameras only); an identity listed in an id file but found in no camera at all is counted and
reported in one logging warning, and the reader goes on.
"""

import logging
import os
from typing import Mapping

from input_pipeline.datasets import folders
from input_pipeline.datasets.folders import image_set_counts, read_id_file
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
ID_FILES = {"train": ("exp/train_id.txt", "exp/val_id.txt"), "test": ("exp/test_id.txt",)}
PUBLISHED_COUNTS = folders.PUBLISHED_COUNTS["SYSU-MM01"]
compare_with_published = folders.compare_with_published  # compare_with_published("SYSU-MM01", sysu_counts(sets))
_LAYOUT = """expected the SYSU-MM01 layout (FDNM_SPEC.md §5; the data set as downloaded):
  <root>/
    cam1/ cam2/ cam3/ cam4/ cam5/ cam6/   each <pid:04d>/<img:04d>.jpg
    exp/train_id.txt  exp/val_id.txt  exp/test_id.txt   one line of comma-separated person ids"""
_log = logging.getLogger(__name__)


def read_sysu(root: str) -> dict[str, ImageSet]:
  """The train and test image lists of SYSU-MM01.

  Args:
    root: the SYSU-MM01 folder (holding cam1/ .. cam6/ and exp/).
  Returns:
    {"train_visible", "train_infrared", "test_visible", "test_infrared"} -> ImageSet with absolute paths,
    person ids, camera numbers and modality 0 (RGB cams 1, 2, 4, 5) or 1 (IR cams 3, 6); train = the identities
    of train_id.txt + val_id.txt, test = test_id.txt; order as in the module docstring.
  Raises:
    FileNotFoundError: the root, an id file or a camera folder is missing (names the first one, shows the layout).
    ValueError: a malformed id file (names it), or an identity in both the training and the test lists.
  """
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"SYSU-MM01 folder {root} not found: {_LAYOUT}\nSet config.data.root to it.")
  for rel in ID_FILES["train"] + ID_FILES["test"]:
    if not os.path.isfile(os.path.join(root, rel)):
      raise FileNotFoundError(f"SYSU-MM01 id file {rel} not found under {root}: {_LAYOUT}")
  for cam in RGB_CAMERAS + IR_CAMERAS:
    if not os.path.isdir(os.path.join(root, f"cam{cam}")):
      raise FileNotFoundError(f"SYSU-MM01 camera folder cam{cam}/ not found under {root}: {_LAYOUT}")
  ids = {}
  for part, files in ID_FILES.items():
    ids[part] = sorted(set(i for rel in files for i in read_id_file(os.path.join(root, rel), "SYSU-MM01 id file")))
  both = sorted(set(ids["train"]) & set(ids["test"]))
  if both:
    raise ValueError(f"SYSU-MM01 under {root}: person ids {both[:10]} are in both the training lists "
                     f"({', '.join(ID_FILES['train'])}) and {ID_FILES['test'][0]}. Fix or re-download exp/.")
  sets, missing = {}, {}
  for part in ("train", "test"):
    found = set()
    for kind, cameras, modality in (("visible", RGB_CAMERAS, VISIBLE), ("infrared", IR_CAMERAS, INFRARED)):
      sets[f"{part}_{kind}"] = folders.read_camera_folders(root, ids[part], cameras, modality, found)
    missing[part] = [i for i in ids[part] if i not in found]
  if missing["train"] or missing["test"]:
    _log.warning(
        "SYSU-MM01 under %s: %d of %d training and %d of %d test identities listed in exp/ have no image in any "
        "camera folder (training: %s; test: %s); they are left out. The published set has images of every listed "
        "identity: compare the counts with compare_with_published.", root, len(missing["train"]),
        len(ids["train"]), len(missing["test"]), len(ids["test"]), missing["train"][:10], missing["test"][:10])
  return sets


def sysu_counts(sets: Mapping[str, ImageSet]) -> dict[str, int]:
  """The counts of `read_sysu`'s sets, keys as PUBLISHED_COUNTS: compare them with
  `compare_with_published("SYSU-MM01", counts)`."""
  return image_set_counts(sets)
