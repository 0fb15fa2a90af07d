"""Reader of RegDB's on-disk layout (FDNM_SPEC.md §5), also used for the synthetic set written in it.

  <root>/Visible/<pid>/<file>.bmp
  <root>/Thermal/<pid>/<file>.bmp
  <root>/idx/{train,test}_{visible,thermal}_{1..10}.txt   lines "<path relative to root> <label>"

Labels are kept as written in the list files (RegDB's lists already number each file's identities
0..N-1). Cameras: RegDB has one visible and one thermal camera, numbered 1 (visible) and 2 (thermal);
a file whose name starts with `c<digits>_` (the synthetic set, e.g. `c3_0004.bmp`) takes that camera.
"""

import os
import re
from typing import Sequence

import numpy as np

from fdnm_jax.errors import ConfigError, MissingFileError
from input_pipeline.datasets import folders
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

NUM_TRIALS = 10
VISIBLE_CAMERA = 1  # camera id of RegDB's visible images.
THERMAL_CAMERA = 2  # camera id of RegDB's thermal images.
_LAYOUT = ("expected the layout Visible/<pid>/*.bmp, Thermal/<pid>/*.bmp, "
           "idx/{train,test}_{visible,thermal}_{1..10}.txt (FDNM_SPEC.md §5; RegDB as downloaded)")
_CAMERA_PREFIX = re.compile(r"^c(\d+)_")


def read_regdb(root: str, trial: int, parts: Sequence[str] = ("train", "test")) -> dict[str, ImageSet]:
  """The four image lists of RegDB split `trial` (or those of `parts` only).

  Args:
    root: the RegDB folder (holding Visible/, Thermal/, idx/).
    trial: the split, 1..10.
    parts: which lists to read: ("test",) reads only the test lists (a copy of the data set without its training
      lists evaluates).
  Returns:
    {"train_visible", "train_thermal", "test_visible", "test_thermal"} (of `parts`) -> ImageSet with absolute paths,
    the list files' labels, cameras (see the module docstring) and modality 0 (visible) or 1 (thermal).
  Raises:
    ValueError: `trial` outside 1..10, or a malformed list line (names the file and the line number).
    FileNotFoundError: a missing folder, list file or image (names it, and the expected layout).
  """
  if isinstance(trial, bool) or not isinstance(trial, (int, np.integer)) or not 1 <= trial <= NUM_TRIALS:
    raise ConfigError(f"RegDB trial must be an int in 1..{NUM_TRIALS}, got {trial!r}: set config.data.trial.")
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise MissingFileError(f"RegDB folder {root} not found: {_LAYOUT}. Set config.data.root to it.")
  for folder in ("Visible", "Thermal", "idx"):
    if not os.path.isdir(os.path.join(root, folder)):
      raise MissingFileError(f"RegDB folder {folder}/ not found under {root}: {_LAYOUT}.")
  sets = {}
  for part in parts:
    for kind, modality in (("visible", VISIBLE), ("thermal", INFRARED)):
      rel = f"idx/{part}_{kind}_{trial}.txt"
      if not os.path.isfile(os.path.join(root, rel)):
        raise MissingFileError(f"RegDB split file {rel} not found under {root}: {_LAYOUT}.")
      sets[f"{part}_{kind}"] = folders.read_list_file(root, rel, modality, "RegDB", _LAYOUT + ".",
                                                       lambda p, m=modality: camera_of(p, m))
  return sets


def camera_of(path: str, modality: int) -> int:
  """Camera id of an image: `c<digits>_` file-name prefix if present, else 1 (visible) / 2 (thermal)."""
  match = _CAMERA_PREFIX.match(os.path.basename(path))
  if match:
    return int(match.group(1))
  return VISIBLE_CAMERA if modality == VISIBLE else THERMAL_CAMERA




def regdb_counts(sets: dict) -> dict[str, int]:
  """The counts of `read_regdb`'s sets, keys as folders.PUBLISHED_COUNTS["RegDB"] (thermal counted as infrared)."""
  return folders.image_set_counts({f"{part}_{kind}": sets[f"{part}_{'thermal' if kind == 'infrared' else kind}"]
                                   for part in ("train", "test") for kind in ("visible", "infrared")})
