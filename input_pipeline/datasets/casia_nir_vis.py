"""Reader of CASIA NIR-VIS 2.0 as downloaded: one fold of its "View 2" protocol lists -> four ImageSets.

The layout supported (config.data.root is the folder that holds `protocols/` and the session folders):

  <root>/s1/VIS/<subject>/<nnn>.jpg     ... s4/     VIS images; sessions s1..s4 (s1 = the HFB database)
  <root>/s1/NIR/<subject>/<nnn>.bmp     ... s4/     NIR images
  <root>/protocols/vis_train_<k>.txt    nir_train_<k>.txt    training images of fold k (k = 1..10)
  <root>/protocols/vis_gallery_<k>.txt  nir_probe_<k>.txt    test gallery (VIS) and probes (NIR) of fold k
  (also *_dev.txt: the development fold, not read here)

Each list line is one image path relative to the root, written with Windows separators, e.g. `s2\\VIS\\10117\\001.jpg`;
the subject is the folder above the file. Where this comes from: the file names and the `dev`/1..10 folds from
bioidiap/bob.db.cbsr_nir_vis_2 `bob/db/cbsr_nir_vis_2/create.py` (it maps vis_gallery_<k>/nir_probe_<k> to the
models/probes of View 2 fold k and parses lines as `f.rstrip("\\r\\n").replace("\\\\", "/")`, the subject being
the third component); the backslash paths, the subject = the folder name, and that the listed extension does not
always match the file on disk (.jpg listed, .bmp stored) from stephenkung/NIR_VIS_Face_Recognition
`extract_features.py` (`revise_name`, `feature_extract`, which also shows the cropped copies in `<modality>_128x128`
folders). Some repackaged lists append a label after the path; extra tokens are ignored.

How lines are read (robust to the ways copies of the data set differ):
  - UTF-8 (a BOM is dropped), CRLF or LF line ends, blank lines skipped, the first whitespace token is the path;
    `\\` and `/` both separate folders; leading `./` or `/` is dropped.
  - The path must end `<modality folder>/<subject>/<file>` with the modality folder VIS... in vis_* lists and
    NIR... in nir_* lists (case-insensitive); the subject folder must be a number (it becomes the label, e.g.
    10117). `modality_suffix` (config.data.modality_folder_suffix, e.g. "_128x128") is appended to the modality
    folder: the lists name `VIS`, the cropped copies live in `VIS_128x128`.
  - Files are found case-insensitively, folder by folder; a listed file that does not exist is looked up with the
    same stem and any of the extensions .jpg .jpeg .bmp .png (any case), the listed extension first.
  - A listed image that still cannot be found is an error naming the list file and line. With `skip_missing`
    (config.data.skip_missing_images) it is skipped instead, and the skipped images are counted in a warning
    per list file.
  - Camera id = the session number (s1..s4 -> 1..4), 1 if the path has no session folder.

Training needs both modalities per subject (the identity sampler draws K VIS + K NIR images of each subject):
subjects of the fold's train lists with images of only one modality are dropped from both train sets (a warning
counts them), so that the ID loss has no class the sampler never draws.
"""

import os
import re
from typing import Optional

import numpy as np
from absl import logging

from fdnm_jax.errors import ConfigError, DataError, MissingFileError
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

NUM_FOLDS = 10
NAME = "CASIA NIR-VIS 2.0"
PROTOCOLS_DIR = "protocols"
LIST_FILES = {  # ImageSet name -> (list file pattern, modality, modality folder prefix)
    "train_visible": ("vis_train_{fold}.txt", VISIBLE, "VIS"),
    "train_infrared": ("nir_train_{fold}.txt", INFRARED, "NIR"),
    "gallery": ("vis_gallery_{fold}.txt", VISIBLE, "VIS"),
    "probe": ("nir_probe_{fold}.txt", INFRARED, "NIR"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".bmp", ".png")
LAYOUT = ("expected the CASIA NIR-VIS 2.0 layout s1/ .. s4/ with VIS/<subject>/*.jpg and NIR/<subject>/*.bmp, "
          "and protocols/{vis_train,nir_train,vis_gallery,nir_probe}_<fold>.txt (fold 1..10) whose lines are "
          "image paths like s2\\VIS\\10117\\001.jpg (see input_pipeline/datasets/casia_nir_vis.py)")
_SESSION = re.compile(r"^s(\d+)$", re.IGNORECASE)


class _Resolver:
  """Finds listed paths on disk case-insensitively, caching each folder's listing."""

  def __init__(self, root: str):
    self.root = root
    self._listings: dict[str, dict[str, str]] = {}

  def _entries(self, folder: str) -> dict[str, str]:
    if folder not in self._listings:
      try:
        names = os.listdir(folder)
      except OSError:
        names = []
      entries: dict[str, str] = {}
      for name in sorted(names):
        entries.setdefault(name.lower(), name)
      self._listings[folder] = entries
    return self._listings[folder]

  def child(self, folder: str, name: str) -> Optional[str]:
    """`folder/name` if it exists (exactly or in another case), else None."""
    exact = os.path.join(folder, name)
    if os.path.exists(exact):
      return exact
    found = self._entries(folder).get(name.lower())
    return os.path.join(folder, found) if found else None

  def image(self, parts: list[str]) -> Optional[str]:
    """The image of a listed path (components), with the extension fallback of the module docstring."""
    folder = self.root
    for part in parts[:-1]:
      folder = self.child(folder, part)
      if folder is None or not os.path.isdir(folder):
        return None
    stem, ext = os.path.splitext(parts[-1])
    for candidate in [parts[-1]] + [stem + e for e in IMAGE_EXTENSIONS if e != ext.lower()]:
      path = self.child(folder, candidate)
      if path is not None and os.path.isfile(path):
        return path
    return None


def list_file_path(root: str, name: str, fold: int) -> str:
  """Absolute path of one protocol list of `fold` (e.g. name "probe" -> protocols/nir_probe_3.txt), found
  case-insensitively; raises FileNotFoundError naming it and the layout."""
  resolver = _Resolver(root)
  rel = f"{PROTOCOLS_DIR}/{LIST_FILES[name][0].format(fold=fold)}"
  protocols = resolver.child(root, PROTOCOLS_DIR)
  path = resolver.child(protocols, os.path.basename(rel)) if protocols else None
  if path is None or not os.path.isfile(path):
    raise MissingFileError(f"{NAME} protocol list {rel} not found under {root}: {LAYOUT}.")
  return path


def read_protocol_list(root: str, list_path: str, modality: int, folder_prefix: str, *, modality_suffix: str = "",
                       skip_missing: bool = False, resolver: Optional[_Resolver] = None
                       ) -> tuple[ImageSet, list[str]]:
  """Reads one protocol list file.

  Args:
    root: the data set's folder; list_path: the list file.
    modality: VISIBLE or INFRARED (of every listed image); folder_prefix: "VIS" or "NIR", the modality folder
      every line must name.
    modality_suffix: appended to the modality folder (e.g. "_128x128").
    skip_missing: skip listed images that cannot be found instead of raising.
  Returns:
    (images in list order with absolute paths, subject labels and session cameras; the listed paths skipped).
  Raises:
    ValueError: a line whose path is not `.../<VIS|NIR>/<subject number>/<file>` (names the file and line).
    FileNotFoundError: a listed image that cannot be found (names the list file and line), unless skip_missing.
  """
  resolver = resolver or _Resolver(root)
  rel = os.path.relpath(list_path, root)
  paths, labels, cameras, skipped = [], [], [], []
  with open(list_path, encoding="utf-8-sig", newline="") as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, start=1):
    fields = line.split()
    if not fields:
      continue
    listed = fields[0]
    parts = [p for p in listed.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 3 or not parts[-3].upper().startswith(folder_prefix) or not parts[-2].isdigit():
      raise DataError(f"{list_path}, line {number}: expected an image path like s2\\{folder_prefix}\\10117\\001.jpg "
                      f"(<session>\\{folder_prefix}\\<subject number>\\<file>), got {line.strip()!r}. Fix or "
                      f"re-download the {NAME} protocol lists ({LAYOUT}).")
    parts[-3] += modality_suffix
    image = resolver.image(parts)
    if image is None:
      if skip_missing:
        skipped.append(listed)
        continue
      raise MissingFileError(
          f"{NAME} image {listed} (listed in {rel}, line {number}) not found under {root}, also not with another "
          f"letter case or extension ({', '.join(IMAGE_EXTENSIONS)}): {LAYOUT}. Restore the file, or set "
          "config.data.skip_missing_images=True to skip (and count) listed images that are missing.")
    session = _SESSION.match(parts[-4]) if len(parts) >= 4 else None
    paths.append(os.path.abspath(image))
    labels.append(int(parts[-2]))
    cameras.append(int(session.group(1)) if session else 1)
  image_set = ImageSet(paths=tuple(paths), labels=np.array(labels, np.int32), cameras=np.array(cameras, np.int32),
                       modality=modality)
  return image_set, skipped


def _keep(image_set: ImageSet, ids: np.ndarray) -> ImageSet:
  return image_set.subset(np.flatnonzero(np.isin(image_set.labels, ids)))


def check_fold(fold) -> int:
  """`fold` as an int in 1..10, else ValueError naming config.data.fold."""
  if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 1 <= fold <= NUM_FOLDS:
    raise ConfigError(f"{NAME} fold must be an int in 1..{NUM_FOLDS}, got {fold!r}: set config.data.fold "
                      "(or config.evals.face_folds).")
  return int(fold)


def check_root(root: str) -> str:
  """The absolute data-set folder; FileNotFoundError naming it and the layout if it or protocols/ is missing."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise MissingFileError(f"{NAME} folder {root} not found: {LAYOUT}. Set config.data.root to it.")
  protocols = _Resolver(root).child(root, PROTOCOLS_DIR)
  if protocols is None or not os.path.isdir(protocols):
    raise MissingFileError(f"{NAME} folder {PROTOCOLS_DIR}/ not found under {root}: {LAYOUT}.")
  return root


def read_fold(root: str, fold: int, parts=tuple(LIST_FILES), *, modality_suffix: str = "",
              skip_missing: bool = False) -> dict[str, ImageSet]:
  """The image sets of one fold, as listed (no filtering): name in `parts` -> ImageSet."""
  fold, root = check_fold(fold), check_root(root)
  resolver = _Resolver(root)
  sets = {}
  for name in parts:
    _, modality, prefix = LIST_FILES[name]
    list_path = list_file_path(root, name, fold)
    sets[name], skipped = read_protocol_list(root, list_path, modality, prefix, modality_suffix=modality_suffix,
                                             skip_missing=skip_missing, resolver=resolver)
    if skipped:
      logging.warning("%s: skipped %d image(s) of %s not found under %s (config.data.skip_missing_images), "
                      "e.g. %s", NAME, len(skipped), os.path.relpath(list_path, root), root, skipped[:3])
    if len(sets[name]) == 0:
      raise DataError(f"{NAME} protocol list {os.path.relpath(list_path, root)} under {root} lists no image"
                      f"{' that exists' if skipped else ''}: {LAYOUT}.")
  return sets


def read_casia_nir_vis(root: str, fold: int, *, modality_suffix: str = "",
                       skip_missing: bool = False) -> dict[str, ImageSet]:
  """The four image lists of CASIA NIR-VIS 2.0 fold `fold` (View 2).

  Args:
    root: the data-set folder (holding s1/ .. s4/ and protocols/).
    fold: 1..10.
    modality_suffix, skip_missing: see the module docstring.
  Returns:
    {"train_visible", "train_infrared" (subjects with both modalities only), "gallery" (VIS), "probe" (NIR)} ->
    ImageSet with absolute paths, subject labels as numbered by the data set, session cameras.
  Raises:
    ValueError: bad fold, a malformed list line, an empty list, or no training subject with both modalities.
    FileNotFoundError: a missing folder, list file or (unless skip_missing) listed image; names it.
  """
  sets = read_fold(root, fold, modality_suffix=modality_suffix, skip_missing=skip_missing)
  vis, nir = sets["train_visible"], sets["train_infrared"]
  both = np.intersect1d(vis.labels, nir.labels)
  one = np.setxor1d(vis.labels, nir.labels)
  if len(both) == 0:
    raise DataError(f"{NAME} fold {fold}: no training subject has both VIS and NIR images in "
                    f"protocols/vis_train_{fold}.txt and nir_train_{fold}.txt: {LAYOUT}.")
  if len(one):
    logging.warning("%s fold %d: %d training subject(s) have images of only one modality and are left out of "
                    "training (the sampler needs both): %s", NAME, fold, len(one), one[:10].tolist())
    sets["train_visible"], sets["train_infrared"] = _keep(vis, both), _keep(nir, both)
  missing = np.setdiff1d(sets["probe"].labels, sets["gallery"].labels)
  if len(missing):
    logging.warning("%s fold %d: %d probe subject(s) have no gallery image (left out of Rank-1): %s", NAME, fold,
                    len(missing), missing[:10].tolist())
  return sets
