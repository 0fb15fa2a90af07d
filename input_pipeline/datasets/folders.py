"""Helpers shared by the readers of folder-per-identity data sets (SYSU-MM01, LLCM): id files, identity folders,
counts and the published counts they are compared with."""

import os
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from fdnm_jax.errors import DataError, MissingFileError
from input_pipeline.datasets.image_set import ImageSet

# The published counts (FDNM_SPEC.md §5). SYSU-MM01 (Wu et al. 2017, and the output of AGW's pre_process_sysu):
# train = train_id + val_id. LLCM (Zhang & Wang, CVPR 2023): 1,064 identities, 713 for training.
PUBLISHED_COUNTS = {
    "SYSU-MM01": {"train_ids": 395, "train_visible_images": 22258, "train_infrared_images": 11909,
                  "test_ids": 96, "test_infrared_images": 3803},
    "LLCM": {"train_ids": 713, "test_ids": 1064 - 713},
    # RegDB (Nguyen et al. 2017): 412 ids x 10 visible + 10 thermal images; every split 206 train / 206 test ids.
    "RegDB": {"train_ids": 206, "test_ids": 206, "train_visible_images": 2060, "train_infrared_images": 2060,
              "test_visible_images": 2060, "test_infrared_images": 2060},
}


def read_id_file(path: str, what: str = "id file") -> list[int]:
  """The person ids of a one-line comma-separated id file (SYSU-MM01 exp/*_id.txt, LLCM idx/test_id.txt).

  Whitespace around the ids and empty lines after the first are ignored.
  Raises:
    ValueError: an empty file, a token that is not a non-negative integer, or a repeated id (names the file).
  """
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f.read().splitlines()]
  lines = [line for line in lines if line]
  if len(lines) != 1:
    raise DataError(f"{what} {path}: expected one line of comma-separated person ids, got {len(lines)} non-empty "
                    "lines. Fix or re-download the file.")
  ids = []
  for token in lines[0].split(","):
    token = token.strip()
    if not re.fullmatch(r"\d+", token):
      raise DataError(f"{what} {path}: {token!r} is not a non-negative integer person id (expected one line like "
                      "'1,2,4,5'). Fix or re-download the file.")
    ids.append(int(token))
  repeated = sorted({i for i in ids if ids.count(i) > 1})
  if repeated:
    raise DataError(f"{what} {path}: person ids {repeated[:10]} are listed more than once. Fix or re-download "
                    "the file.")
  return ids


def list_images(folder: str) -> list[str]:
  """The files of one identity folder, sorted by path; names starting with "." are skipped."""
  return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))


def list_subfolders(folder: str) -> list[str]:
  """The names of the sub-folders of `folder`, sorted; names starting with "." are skipped."""
  return sorted(name for name in os.listdir(folder)
                if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))


def image_set_counts(sets: Mapping[str, ImageSet]) -> dict[str, int]:
  """Identities and images of the four sets: {part}_ids (either modality) and {part}_{kind}_images."""
  counts = {}
  for part in ("train", "test"):
    pids = set()
    for kind in ("visible", "infrared"):
      s = sets[f"{part}_{kind}"]
      counts[f"{part}_{kind}_images"] = len(s)
      pids |= set(s.labels.tolist())
    counts[f"{part}_ids"] = len(pids)
  return counts


def compare_with_published(name: str, counts: Mapping[str, int],
                           published: Optional[Mapping[str, int]] = None) -> list[str]:
  """One line per published count of data set `name` that `counts` differs from or lacks; empty if all match.

  Args:
    name: "SYSU-MM01" or "LLCM" (the keys of PUBLISHED_COUNTS), or any name with `published` given.
    counts: e.g. `sysu.sysu_counts(sets)`; keys {train,test}_ids, {train,test}_{visible,infrared}_images.
    published: the counts to compare with; None = PUBLISHED_COUNTS[name].
  """
  if published is None:
    if name not in PUBLISHED_COUNTS:
      raise ValueError(f"no published counts for data set {name!r}: use one of {sorted(PUBLISHED_COUNTS)}")
    published = PUBLISHED_COUNTS[name]
  lines = []
  for key, expected in published.items():
    got = counts.get(key)
    if got is None:
      lines.append(f"{name}: {key} not counted (published {expected:,})")
    elif got != expected:
      lines.append(f"{name}: {key} = {got:,}, published {expected:,} ({got - expected:+,})")
  return lines


def read_list_file(root: str, rel: str, modality: int, dataset: str, layout: str,
                   camera_of: Callable[[str], int]) -> ImageSet:
  """Reads a list file of `<relative image path> <label>` lines (RegDB idx/*.txt, LLCM idx/train_*.txt).

  Args:
    root: the data set's folder; `rel`: the list file, relative to it.
    modality: 0 visible, 1 infrared (of every listed image).
    dataset, layout: the data set's name and expected layout, for the error messages.
    camera_of: relative image path (as listed) -> camera id.
  Returns:
    The listed images in file order (absolute paths), labels as written.
  Raises:
    ValueError: a malformed line (the message names the file and the line number).
    FileNotFoundError: a listed image that does not exist.
  """
  path = os.path.join(root, rel)
  paths, labels, cameras = [], [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2 or not re.fullmatch(r"\d+", fields[1]):
        raise DataError(f"{path}, line {number}: expected '<relative image path> <non-negative integer label>', "
                        f"got {line.rstrip()!r}. Fix or re-download the {dataset} list files.")
      image = os.path.normpath(os.path.join(root, fields[0]))
      if not os.path.isfile(image):
        raise MissingFileError(f"{dataset} image {fields[0]} (listed in {rel}, line {number}) not found under "
                               f"{root}: {layout}")
      paths.append(image)
      labels.append(int(fields[1]))
      cameras.append(camera_of(fields[0]))
  return ImageSet(paths=tuple(paths), labels=np.array(labels, np.int32), cameras=np.array(cameras, np.int32),
                  modality=modality)


def read_camera_folders(base: str, ids: Sequence[int], cameras: Sequence[int], modality: int,
                        found: set) -> ImageSet:
  """The images of `base/cam<c>/<pid:04d>/` for every id, then every camera (AGW / DEEN order), files sorted.

  Folders that do not exist are skipped; every id with at least one image is added to `found`.
  """
  paths, labels, cams = [], [], []
  for pid in ids:
    for cam in cameras:
      directory = os.path.join(base, f"cam{cam}", f"{pid:04d}")
      if not os.path.isdir(directory):
        continue
      files = list_images(directory)
      if files:
        found.add(pid)
      paths += files
      labels += [pid] * len(files)
      cams += [cam] * len(files)
  return ImageSet(paths=tuple(paths), labels=np.array(labels, np.int32), cameras=np.array(cams, np.int32),
                  modality=modality)
