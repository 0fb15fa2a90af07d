"""A list of images of one modality with their person ids and cameras: what every reader returns."""

import dataclasses
from typing import Optional

import numpy as np

VISIBLE = 0  # ImageSet.modality of visible (RGB) images.
INFRARED = 1  # ImageSet.modality of infrared (thermal / near-infrared) images.


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
  """Images of one modality, in file-list order.

  Attributes:
    paths: absolute file paths, one per image.
    labels: int32 [N], person ids as written in the data set's list files (not relabelled).
    cameras: int32 [N], camera ids (1-based, as the data set numbers them).
    modality: VISIBLE (0) or INFRARED (1).
    encoded: None (read the images from `paths`), or the images' encoded bytes, one per path (a prepared TFDS
      set: then `paths` are relative to the download folder and only name the images).

  The arrays are converted to int32 and made read-only. Equality is identity (`eq=False`): compare the
  fields yourself, since `==` on NumPy arrays is element-wise.
  """
  paths: tuple[str, ...]
  labels: np.ndarray
  cameras: np.ndarray
  modality: int
  encoded: Optional[tuple[bytes, ...]] = None

  def __post_init__(self):
    paths = tuple(str(p) for p in self.paths)
    labels = np.array(self.labels, dtype=np.int32).reshape(-1)
    cameras = np.array(self.cameras, dtype=np.int32).reshape(-1)
    if not len(paths) == len(labels) == len(cameras):
      raise ValueError(f"ImageSet needs one label and one camera per path: got {len(paths)} paths, "
                       f"{len(labels)} labels, {len(cameras)} cameras.")
    if self.modality not in (VISIBLE, INFRARED):
      raise ValueError(f"ImageSet.modality must be {VISIBLE} (visible) or {INFRARED} (infrared), "
                       f"got {self.modality!r}.")
    labels.setflags(write=False)
    cameras.setflags(write=False)
    object.__setattr__(self, "paths", paths)
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "cameras", cameras)
    object.__setattr__(self, "modality", int(self.modality))
    if self.encoded is not None:
      encoded = tuple(bytes(b) for b in self.encoded)
      if len(encoded) != len(paths):
        raise ValueError(f"ImageSet needs one encoded image per path: got {len(paths)} paths, {len(encoded)} "
                         "encoded images.")
      object.__setattr__(self, "encoded", encoded)

  def subset(self, indices) -> "ImageSet":
    """The images at `indices` (int [M]), in that order."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    return ImageSet(paths=tuple(self.paths[i] for i in indices), labels=self.labels[indices],
                    cameras=self.cameras[indices], modality=self.modality,
                    encoded=None if self.encoded is None else tuple(self.encoded[i] for i in indices))

  def __len__(self) -> int:
    return len(self.paths)
