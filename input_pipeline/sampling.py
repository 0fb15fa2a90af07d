"""The cross-modality identity sampler: P identities x K visible + K infrared images per batch."""

import math

import numpy as np

from fdnm_jax.errors import ConfigError, DataError


class CrossModalitySampler:
  """Which images make up each training batch (FDNM_SPEC.md §3, DEEN's IdentitySampler).

  Each batch draws P identities without replacement among those present in both modalities, then K
  visible and K infrared images of each, with replacement. Batch `step` is a pure function of
  (seed, step): a resumed run sees exactly the batches the uninterrupted run would have seen.
  """

  def __init__(self, visible_labels: np.ndarray, infrared_labels: np.ndarray, num_ids_per_batch: int,
               num_instances: int, seed: int):
    """Args:
      visible_labels: int [Nv], person id of each visible image (any integer ids).
      infrared_labels: int [Ni], person id of each infrared image.
      num_ids_per_batch: P.
      num_instances: K, images per identity per modality.
      seed: non-negative int.
    Raises:
      ValueError: P or K < 1, a negative seed, or fewer than P identities shared by both modalities.
    """
    if num_ids_per_batch < 1 or num_instances < 1:
      raise ConfigError(f"The sampler needs num_ids_per_batch >= 1 and num_instances >= 1, got "
                        f"{num_ids_per_batch} and {num_instances} (config.input).")
    if seed < 0:
      raise ConfigError(f"The sampler seed must be >= 0, got {seed} (config.seed).")
    self._vis = np.asarray(visible_labels).reshape(-1)
    self._ir = np.asarray(infrared_labels).reshape(-1)
    self.num_ids_per_batch = int(num_ids_per_batch)
    self.num_instances = int(num_instances)
    self.seed = int(seed)
    self.identities = np.intersect1d(self._vis, self._ir)  # sorted ascending
    if len(self.identities) < self.num_ids_per_batch:
      raise DataError(
          f"Only {len(self.identities)} identities have both visible and infrared training images, fewer than "
          f"num_ids_per_batch={self.num_ids_per_batch}: lower config.input.num_ids_per_batch or check the data "
          "set's train lists.")
    self._vis_pos = {int(p): np.flatnonzero(self._vis == p) for p in self.identities}
    self._ir_pos = {int(p): np.flatnonzero(self._ir == p) for p in self.identities}

  @property
  def batch_size(self) -> int:
    """P * K: images per modality per batch."""
    return self.num_ids_per_batch * self.num_instances

  @property
  def steps_per_epoch(self) -> int:
    """ceil(max(#visible, #infrared) / (P * K)): an epoch sees about as many images as the larger modality."""
    return max(1, math.ceil(max(len(self._vis), len(self._ir)) / self.batch_size))

  def batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Image indices of batch `step` (>= 0).

    Returns:
      (visible, infrared): int64 [P*K] each, indices into the label arrays, ordered identity by identity
      (the K images of the first drawn identity, then the next one's...), the same identities in the
      same order in both.
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    rng = np.random.default_rng([self.seed, int(step)])
    ids = rng.choice(self.identities, size=self.num_ids_per_batch, replace=False)
    k = self.num_instances
    vis = np.concatenate([rng.choice(self._vis_pos[int(p)], size=k, replace=True) for p in ids])
    ir = np.concatenate([rng.choice(self._ir_pos[int(p)], size=k, replace=True) for p in ids])
    return vis.astype(np.int64), ir.astype(np.int64)
