"""FDNM's losses (FDNM_SPEC §2) as pure functions of arrays; all math in float32.

Distances follow AGW/DEEN's `pdist_torch`: d(a, b) = sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12)),
with the dot products at full float32 precision (`Precision.HIGHEST`) on every backend.
Batch order is never assumed: identities and modalities come from the `labels`
and `modality` arrays, and every selection is a mask, so all functions are
jit-compatible with static shapes.
"""

from typing import Any

import jax
import jax.numpy as jnp

from fdnm_jax.errors import ConfigError

_HIGHEST = jax.lax.Precision.HIGHEST


def pairwise_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances [M, N] between rows of a [M, D] and b [N, D] (AGW's clamped sqrt)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  sq = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]
        - 2.0 * jnp.matmul(a, b.T, precision=_HIGHEST))
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def _row_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances [N] between matching rows of a, b [N, D], clamped like `pairwise_distance`."""
  diff = a - b
  return jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, axis=1), 1e-12))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy, PyTorch's label smoothing (target (1-e) one-hot + e/C).

  Args:
    logits: [B, C] (any float dtype; computed in float32).
    labels: [B] int class ids in [0, C).
    label_smoothing: e in [0, 1].

  Returns:
    float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))


def batch_hard_triplet(features: jax.Array, labels: jax.Array, margin: float = 0.3) -> jax.Array:
  """AGW's batch-hard triplet loss (OriTripletLoss).

  Per anchor: the hardest positive (max distance over the same label, the anchor
  itself included) and the hardest negative (min distance over other labels);
  loss = mean over anchors of relu(d_ap - d_an + margin). An anchor without any
  negative in the batch contributes 0 (AGW fails there).

  Args:
    features: [B, D] float features.
    labels: [B] int identities.
    margin: triplet margin.

  Returns:
    float32 scalar.
  """
  dist = pairwise_distance(features, features)
  same = labels[:, None] == labels[None, :]
  d_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  has_neg = jnp.any(~same, axis=1)
  d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  d_an = jnp.where(has_neg, d_an, 0.0)
  return jnp.mean(jnp.where(has_neg, jax.nn.relu(d_ap - d_an + margin), 0.0))


def _softmax_weights(dist: jax.Array, mask: jax.Array) -> jax.Array:
  """AGW's `softmax_weights`: masked row softmax with a 1e-6 guard on the normaliser."""
  max_v = jnp.max(dist * mask, axis=1, keepdims=True)
  diff = dist - max_v
  z = jnp.sum(jnp.exp(diff) * mask, axis=1, keepdims=True) + 1e-6
  return jnp.exp(diff) * mask / z


def weighted_regularized_triplet(features: jax.Array, labels: jax.Array) -> jax.Array:
  """AGW's weighted regularised triplet (TripletLoss_WRT), without feature normalisation.

  Positives are weighted by softmax(d) and negatives by softmax(-d) over each
  anchor's row; loss = mean over anchors of softplus(weighted_ap - weighted_an)
  (PyTorch SoftMarginLoss with target 1).

  Args:
    features: [B, D] float features.
    labels: [B] int identities.

  Returns:
    float32 scalar.
  """
  dist = pairwise_distance(features, features)
  is_pos = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  is_neg = 1.0 - is_pos
  dist_ap = dist * is_pos
  dist_an = dist * is_neg
  furthest_positive = jnp.sum(dist_ap * _softmax_weights(dist_ap, is_pos), axis=1)
  closest_negative = jnp.sum(dist_an * _softmax_weights(-dist_an, is_neg), axis=1)
  return jnp.mean(jax.nn.softplus(furthest_positive - closest_negative))


def center_nuances_mining(original: jax.Array, nuance: jax.Array, labels: jax.Array, modality: jax.Array,
                          margin: float = 0.2) -> jax.Array:
  """Center-guided nuances mining loss L_cnm (FDNM_SPEC §2, after DEEN's CPMLoss).

  For each identity p in the batch: c1, c2 = visible / infrared means of its
  `original` features, c3, c4 = visible / infrared means of its `nuance`
  features; d Euclidean (clamped sqrt), sg = stop-gradient, [.]+ = relu:
    L123(p) = [d(c2,c3) - sg(d(c1,c3)) + m]+
              + 1/2 ([d(c2,c3) - min_{q!=p} d(c3_p,c3_q) + m]+ + [d(c2,c3) - min_{q!=p} d(c1_p,c1_q) + m]+)
    L124(p) = [d(c1,c4) - sg(d(c2,c4)) + m]+
              + 1/2 ([d(c1,c4) - min_{q!=p} d(c4_p,c4_q) + m]+ + [d(c1,c4) - min_{q!=p} d(c2_p,c2_q) + m]+)
    L = mean_p (L123(p) + L124(p)) / 2.

  Which identities count: an identity is used (as p and as q) only if the batch
  holds at least one visible and one infrared image of it. If fewer than two such
  identities are present there is no q != p and the loss is 0 (with zero
  gradients); DEEN's code fails in that case. Centers are computed per sample
  slot with [B, B] masks (each identity is represented by its first slot), so
  shapes are static and the batch may be in any order.

  Args:
    original: [B, D] pre-BN pooled features of the original map.
    nuance: [B, D] pre-BN pooled features of one nuance branch.
    labels: [B] int identities.
    modality: [B] int, 0 = visible, 1 = infrared.
    margin: m.

  Returns:
    float32 scalar (>= 0).
  """
  original = original.astype(jnp.float32)
  nuance = nuance.astype(jnp.float32)
  batch = labels.shape[0]
  same_id = labels[:, None] == labels[None, :]

  def centers(mod: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    weights = (same_id & (modality == mod)[None, :]).astype(jnp.float32)
    count = jnp.sum(weights, axis=1)
    weights = weights / jnp.maximum(count, 1.0)[:, None]
    return (jnp.matmul(weights, original, precision=_HIGHEST),
            jnp.matmul(weights, nuance, precision=_HIGHEST), count)

  c1, c3, count_vis = centers(0)
  c2, c4, count_ir = centers(1)
  earlier = jnp.tril(jnp.ones((batch, batch), dtype=bool), k=-1)
  first_slot = ~jnp.any(same_id & earlier, axis=1)
  valid = first_slot & (count_vis > 0) & (count_ir > 0)
  neg = valid[:, None] & valid[None, :] & ~same_id
  has_neg = jnp.any(neg, axis=1)
  used = valid & has_neg

  def hardest_negative(c: jax.Array) -> jax.Array:
    d = jnp.min(jnp.where(neg, pairwise_distance(c, c), jnp.inf), axis=1)
    return jnp.where(has_neg, d, 0.0)

  def hinge(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x + margin)

  d23 = _row_distance(c2, c3)
  d13 = jax.lax.stop_gradient(_row_distance(c1, c3))
  l123 = hinge(d23 - d13) + 0.5 * (hinge(d23 - hardest_negative(c3)) + hinge(d23 - hardest_negative(c1)))
  d14 = _row_distance(c1, c4)
  d24 = jax.lax.stop_gradient(_row_distance(c2, c4))
  l124 = hinge(d14 - d24) + 0.5 * (hinge(d14 - hardest_negative(c4)) + hinge(d14 - hardest_negative(c2)))
  per_identity = jnp.where(used, 0.5 * (l123 + l124), 0.0)
  return jnp.sum(per_identity) / jnp.maximum(jnp.sum(used), 1)


def orthogonality(n1: jax.Array, n2: jax.Array) -> jax.Array:
  """DEEN's orthogonality term between two nuance branches: mean over samples of <g1, g2>.

  DEEN computes `triu(G, 1).sum() / (3B)` with G the 2x2 Gram matrix of
  [g1, g2] per sample over its tripled batch, i.e. sum_b <g1_b, g2_b> / (3B);
  this returns sum_b <g1_b, g2_b> / B (the spec's mean over samples), so DEEN's
  lambda_2 = 0.01 corresponds to ortho_weight = 0.01 / 3. The raw dot product is
  not bounded below when the features can be negative (ANM's BN outputs).

  Args:
    n1, n2: [B, D] pre-BN pooled nuance features.

  Returns:
    float32 scalar.
  """
  n1 = n1.astype(jnp.float32)
  n2 = n2.astype(jnp.float32)
  return jnp.mean(jnp.sum(n1 * n2, axis=-1))


def _triplet_groups(outputs: dict[str, jax.Array]) -> list[jax.Array]:
  """Splits `features` [R, B, D] into entry groups: the branch globals, then one group per stripe."""
  features = outputs["features"]
  num_entries = features.shape[0]
  part_features = outputs.get("part_features")
  num_branches = num_entries if part_features is None else part_features.shape[1]
  return [features[g:g + num_branches] for g in range(0, num_entries, num_branches)]


def total_loss(outputs: dict[str, jax.Array], labels: jax.Array, modality: jax.Array,
               loss_config: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FDNM's training loss: L = w_id L_id + w_tri L_tri + w_cnm L_cnm + w_ort L_ort.

  - L_id: mean over the R entries of `cross_entropy(logits[r], labels, label_smoothing)`.
  - L_tri: the triplet (`loss_config.triplet`: "hard" with `triplet_margin`, or
    "wrt") on the entries of a group concatenated along the batch, labels
    repeated per entry (as DEEN does over its branches). Groups: the branch
    globals form one group; with num_parts > 0 each stripe index forms another
    (so a stripe is never compared with a global feature), and L_tri is the mean
    over groups. Without parts this is exactly the spec's single triplet.
  - L_cnm: sum over the nuance branches i of
    `center_nuances_mining(original, nuances[i], labels, modality, cnm_margin)`, original = the model's
    "cnm_original" output (config.model.cnm_original; "global", the raw pooled original, when absent).
  - L_ort: `orthogonality(nuances[0], nuances[1])`.
  L_cnm and L_ort are 0 without nuances.

  Args:
    outputs: the dict returned by `FDNM` ("features", "logits", "global" or "cnm_original",
      "nuances", and "part_features" for the groups; without it all entries form one group).
    labels: [B] int identities of the batch rows.
    modality: [B] int, 0 = visible, 1 = infrared.
    loss_config: `config.loss` (id_weight, label_smoothing, triplet, triplet_weight,
      triplet_margin, cnm_weight, cnm_margin, ortho_weight).

  Returns:
    (total, {"id", "triplet", "cnm", "ortho", "total"}), float32 scalars; the
    terms in the dict are unweighted, "total" is the weighted sum.
  """
  if loss_config.triplet == "hard":
    triplet_fn = lambda f, l: batch_hard_triplet(f, l, loss_config.triplet_margin)
  elif loss_config.triplet == "wrt":
    triplet_fn = weighted_regularized_triplet
  else:
    raise ConfigError(f"loss.triplet={loss_config.triplet!r}: expected 'hard' or 'wrt'.")

  logits = outputs["logits"]
  id_loss = jnp.mean(jnp.stack([cross_entropy(logits[r], labels, loss_config.label_smoothing)
                                for r in range(logits.shape[0])]))
  triplet_terms = []
  for group in _triplet_groups(outputs):
    triplet_terms.append(triplet_fn(group.reshape(-1, group.shape[-1]), jnp.tile(labels, group.shape[0])))
  triplet = jnp.mean(jnp.stack(triplet_terms))

  nuances = outputs["nuances"]
  zero = jnp.zeros((), jnp.float32)
  original = outputs.get("cnm_original", outputs["global"])
  cnm = sum((center_nuances_mining(original, nuances[i], labels, modality, loss_config.cnm_margin)
             for i in range(nuances.shape[0])), zero)
  ortho = orthogonality(nuances[0], nuances[1]) if nuances.shape[0] >= 2 else zero

  total = (loss_config.id_weight * id_loss + loss_config.triplet_weight * triplet
           + loss_config.cnm_weight * cnm + loss_config.ortho_weight * ortho)
  return total, {"id": id_loss, "triplet": triplet, "cnm": cnm, "ortho": ortho, "total": total}
