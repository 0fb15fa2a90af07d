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
from typing import Any, Mapping, Sequence

import numpy as np

from fdnm_jax.errors import DataError, MissingFileError
from input_pipeline.datasets import folders
from input_pipeline.datasets.folders import image_set_counts, read_id_file
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
RAND_PERM_FILE = "exp/rand_perm_cam.mat"  # official gallery permutations (SYSU-MM01 repo, evaluation/data_split).
ID_FILES = {"train": ("exp/train_id.txt", "exp/val_id.txt"), "test": ("exp/test_id.txt",)}
PUBLISHED_COUNTS = folders.PUBLISHED_COUNTS["SYSU-MM01"]
compare_with_published = folders.compare_with_published  # compare_with_published("SYSU-MM01", sysu_counts(sets))
_LAYOUT = """expected the SYSU-MM01 layout (FDNM_SPEC.md §5; the data set as downloaded):
  <root>/
    cam1/ cam2/ cam3/ cam4/ cam5/ cam6/   each <pid:04d>/<img:04d>.jpg
    exp/train_id.txt  exp/val_id.txt  exp/test_id.txt   one line of comma-separated person ids"""
_log = logging.getLogger(__name__)


def read_sysu(root: str, parts: Sequence[str] = ("train", "test")) -> dict[str, ImageSet]:
  """The train and test image lists of SYSU-MM01 (or those of `parts` only).

  Args:
    root: the SYSU-MM01 folder (holding cam1/ .. cam6/ and exp/).
    parts: which lists to read: ("test",) needs only exp/test_id.txt and the test identities' folders (a copy of
      the data set without its training part evaluates); the train/test overlap check then has nothing to check.
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
    raise MissingFileError(f"SYSU-MM01 folder {root} not found: {_LAYOUT}\nSet config.data.root to it.")
  for rel in (rel for part in parts for rel in ID_FILES[part]):
    if not os.path.isfile(os.path.join(root, rel)):
      raise MissingFileError(f"SYSU-MM01 id file {rel} not found under {root}: {_LAYOUT}")
  for cam in RGB_CAMERAS + IR_CAMERAS:
    if not os.path.isdir(os.path.join(root, f"cam{cam}")):
      raise MissingFileError(f"SYSU-MM01 camera folder cam{cam}/ not found under {root}: {_LAYOUT}")
    if not folders.list_subfolders(os.path.join(root, f"cam{cam}")):
      raise MissingFileError(f"SYSU-MM01 camera folder {os.path.join(root, f'cam{cam}')} is empty (no <pid:04d>/ "
                             f"identity folder): the download is incomplete; re-download or re-extract it. {_LAYOUT}")
  ids = {"train": [], "test": []}
  for part in parts:
    ids[part] = sorted(set(i for rel in ID_FILES[part]
                           for i in read_id_file(os.path.join(root, rel), "SYSU-MM01 id file")))
  both = sorted(set(ids["train"]) & set(ids["test"]))
  if both:
    raise DataError(f"SYSU-MM01 under {root}: person ids {both[:10]} are in both the training lists "
                    f"({', '.join(ID_FILES['train'])}) and {ID_FILES['test'][0]}. Fix or re-download exp/.")
  sets, missing = {}, {"train": [], "test": []}
  for part in parts:
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


def has_rand_perm(root: str) -> bool:
  """Whether the download has the official gallery permutations exp/rand_perm_cam.mat."""
  return os.path.isfile(os.path.join(os.fspath(root), RAND_PERM_FILE))


def read_rand_perm(root: str) -> dict[str, list]:
  """The official gallery permutations of SYSU-MM01 (exp/rand_perm_cam.mat), as JSON-able lists.

  The file (wuancong/SYSU-MM01, evaluation/data_split/rand_perm_cam.mat; read by the MPANet / SAAI test code with
  scipy.io.loadmat) holds `rand_perm_cam`, a 6 x 1 cell: cell c-1 (camera c) is a cell of one entry per person id
  1..533 (entry pid-1), each a [trials, images] matrix of 1-based image numbers: row t lists the images of
  (camera c, person pid) in the order trial t draws them (image n is cam<c>/<pid:04d>/<n:04d>.jpg). An identity with
  no image in a camera has an empty entry.

  Returns:
    {"<camera>": [per person id 1..: [[image numbers of trial 0], [trial 1], ...] or [] when empty]} for cameras 1..6.
  Raises:
    FileNotFoundError: no exp/rand_perm_cam.mat under `root`.
    ValueError: the file has no `rand_perm_cam` cell of 6 cameras (names the file).
  """
  import scipy.io  # pylint: disable=g-import-not-at-top  (only for this one file)
  path = os.path.join(os.fspath(root), RAND_PERM_FILE)
  if not os.path.isfile(path):
    raise MissingFileError(f"SYSU-MM01 official gallery permutations {path} not found: copy "
                           "evaluation/data_split/rand_perm_cam.mat of https://github.com/wuancong/SYSU-MM01 into "
                           "exp/, or set config.evals.sysu_gallery_sampling='seeded'.")
  try:
    cells = np.asarray(scipy.io.loadmat(path)["rand_perm_cam"], dtype=object).reshape(-1)
  except (KeyError, ValueError, TypeError, OSError) as e:
    raise DataError(f"{path}: cannot read the 'rand_perm_cam' cell ({e}); re-download the file.") from None
  if len(cells) != len(RGB_CAMERAS + IR_CAMERAS):
    raise DataError(f"{path}: 'rand_perm_cam' has {len(cells)} cameras, expected 6; re-download the file.")
  table = {}
  for cam, cell in enumerate(cells, start=1):
    entries = np.asarray(cell, dtype=object).reshape(-1)
    table[str(cam)] = [np.asarray(e, np.int64).reshape(np.asarray(e).shape[0], -1).tolist()
                       if np.asarray(e).size else [] for e in entries]
  return table


def official_gallery(pids: Any, cams: Any, paths: Sequence[str], rand_perm: Mapping[str, list],
                     cameras: Sequence[int], shot: int, trial: int) -> np.ndarray:
  """The gallery of one trial with the official permutations (the MPANet / SAAI `get_gallery_names` family).

  For every camera of `cameras` and every person id of the gallery set, the first `shot` image numbers of row
  `trial` of rand_perm[camera][pid - 1] name the images "cam<c>/<pid:04d>/<n:04d>"; the gallery is every image of
  the set (on those cameras) whose path, without extension, ends with one of those names, in set order (as
  MPANet's `np.in1d(gallery_names, names)`). An identity with an empty entry in a camera gives no image there.

  Args:
    pids, cams: int [N] person ids and cameras of the RGB test images; paths: their N paths (absolute or relative).
    rand_perm: `read_rand_perm`'s table.
    cameras: gallery cameras; shot: images per (identity, camera); trial: the row, 0-based.
  Returns:
    int64 [G] indices into the set, ascending.
  Raises:
    ValueError: a trial outside the file's rows (names it).
  """
  pids, cams = np.asarray(pids).reshape(-1), np.asarray(cams).reshape(-1)
  names = set()
  ids = np.unique(pids[np.isin(cams, np.asarray(cameras))]).tolist()
  for cam in cameras:
    entries = rand_perm[str(int(cam))]
    for pid in ids:
      if not 1 <= pid <= len(entries) or not entries[pid - 1]:
        continue
      rows = entries[pid - 1]
      if not 0 <= trial < len(rows):
        raise DataError(f"SYSU-MM01 {RAND_PERM_FILE} has {len(rows)} trials for camera {cam}, person {pid}; "
                        f"trial {trial} asked for.")
      names.update(f"cam{int(cam)}/{pid:04d}/{int(n):04d}" for n in rows[trial][:shot])
  keep = [i for i, (path, cam) in enumerate(zip(paths, cams.tolist()))
          if cam in set(int(c) for c in cameras)
          and "/".join(os.path.splitext(str(path).replace(os.sep, "/"))[0].split("/")[-3:]) in names]
  return np.asarray(keep, np.int64)
