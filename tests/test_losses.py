"""Tests of fdnm_jax/losses.py against NumPy references written from AGW / DEEN / FDNM_SPEC §2."""

import types

import jax
import numpy as np
import pytest

from fdnm_jax import losses
from tests.rounding import U

# Jitted float32 losses against float64 NumPy. Each assertion states the first-order worst-case bound of its float32
# program (u per rounding, n u of the magnitudes for an n-term sum or dot product, 2 ulps per exp or log): at most
# 8e-6 relative (plus 1e-6 absolute for a term near zero) except WRT's (WRT_RTOL); LOSS_RTOL covers them all.
LOSS_RTOL = 1e-5
# WRT's worst case, 4.3e-5 relative of the losses below: (1) an anchor's float32 distance to itself is the sqrt
# of |a|^2 + |a|^2 - 2 a.a, whose two 6-term sums leave up to 24 u |a|^2 (seen: 1.4e-3 after the sqrt, not the
# reference's 1e-6), weighed in by the positives' softmax mean, one sign for all anchors: <= 2.2e-5; (2) the
# softmax weights and the 6- and 18-term weighted sums (fp, cn <= 4.6, fp - cn ~ 1): <= 2e-5; (3) the other
# distances: 1.5e-6.
WRT_RTOL = 5e-5


def _np_dist(a, b):
  sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
  return np.sqrt(np.clip(sq, 1e-12, None))


def _np_cross_entropy(logits, labels, eps):
  logits = logits.astype(np.float64)
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  c = logits.shape[1]
  total = 0.0
  for i, y in enumerate(labels):
    total += -(1 - eps) * logp[i, y] - eps / c * logp[i].sum()
  return total / len(labels)


def _np_batch_hard(x, labels, margin):
  d = _np_dist(x.astype(np.float64), x.astype(np.float64))
  terms = []
  for i in range(len(labels)):
    pos = [d[i, j] for j in range(len(labels)) if labels[j] == labels[i]]
    neg = [d[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
    terms.append(max(0.0, max(pos) - min(neg) + margin))
  return np.mean(terms)


def _np_wrt(x, labels):
  d = _np_dist(x.astype(np.float64), x.astype(np.float64))
  terms = []
  for i in range(len(labels)):
    pos = labels == labels[i]
    wp = np.exp(d[i, pos] - d[i, pos].max())
    wn = np.exp(-d[i, ~pos] - (-d[i, ~pos]).max())
    ap = (d[i, pos] * wp).sum() / (wp.sum() + 1e-6)
    an = (d[i, ~pos] * wn).sum() / (wn.sum() + 1e-6)
    terms.append(np.log1p(np.exp(ap - an)))
  return np.mean(terms)


def _np_cnm(original, nuance, labels, modality, m):
  """FDNM_SPEC §2 L_cnm, identity by identity."""
  ids = [p for p in np.unique(labels)
         if ((labels == p) & (modality == 0)).any() and ((labels == p) & (modality == 1)).any()]
  if len(ids) < 2:
    return 0.0
  c = {}
  for p in ids:
    v, r = (labels == p) & (modality == 0), (labels == p) & (modality == 1)
    c[p] = [original[v].mean(0), original[r].mean(0), nuance[v].mean(0), nuance[r].mean(0)]
  d = lambda a, b: np.sqrt(max(((a - b) ** 2).sum(), 1e-12))
  hinge = lambda x: max(0.0, x + m)
  total = 0.0
  for p in ids:
    c1, c2, c3, c4 = c[p]
    mins = [min(d(c[p][k], c[q][k]) for q in ids if q != p) for k in range(4)]
    l123 = hinge(d(c2, c3) - d(c1, c3)) + 0.5 * (hinge(d(c2, c3) - mins[2]) + hinge(d(c2, c3) - mins[0]))
    l124 = hinge(d(c1, c4) - d(c2, c4)) + 0.5 * (hinge(d(c1, c4) - mins[3]) + hinge(d(c1, c4) - mins[1]))
    total += (l123 + l124) / 2
  return total / len(ids)


def _batch(seed, num_ids=4, k=3, dim=6, scale=1.0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(rng.choice(100, num_ids, replace=False), 2 * k)
  modality = np.tile(np.repeat([0, 1], k), num_ids)
  perm = rng.permutation(len(labels))
  x = rng.normal(size=(len(labels), dim)) * scale
  return x[perm].astype(np.float32), labels[perm], modality[perm]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 6)
  value = jax.jit(losses.cross_entropy, static_argnums=2)(logits, labels, eps)
  # log-softmax over C = 5 classes (|logits| <= 7, |log p| <= 8.1), the smoothed sum, the mean over 6 rows: worst
  # case 1.1e-6 relative, 9x below LOSS_RTOL.
  np.testing.assert_allclose(value, _np_cross_entropy(logits, labels, eps), rtol=LOSS_RTOL)


def test_batch_hard_triplet():
  x, labels, _ = _batch(1)
  fn = jax.jit(losses.batch_hard_triplet)  # the margin traced: one program for both margins.
  for margin in (0.3, 5.0):
    # Distances |a|^2 + |b|^2 - 2 a.b over D = 6 (|a|^2 <= 19): <= 8 u (|a|^2 + |b|^2 + 2 |a.b|) / (2 d) <= 3e-6
    # each; two per hinge, the mean of 24 hinges: worst case 2.9e-6 relative, 3.5x below LOSS_RTOL.
    np.testing.assert_allclose(fn(x, labels, margin), _np_batch_hard(x, labels, margin), rtol=LOSS_RTOL)
  single = fn(x, np.zeros_like(labels))
  assert float(single) == 0.0


def test_weighted_regularized_triplet():
  x, labels, _ = _batch(2)
  np.testing.assert_allclose(jax.jit(losses.weighted_regularized_triplet)(x, labels), _np_wrt(x, labels),
                             rtol=WRT_RTOL)


def test_cnm_hand_built_batch_and_stop_gradient():
  # Identity 0: original visible o_v=(0,0), infrared o_i=(1,0); nuance visible (0.5,0), infrared (0,0.05).
  # d(c2,c3)=0.5, d(c1,c3)=0.5 -> first L123 hinge 0.2; d(c1,c4)=0.05, d(c2,c4)~1.001 -> L124 = 0.
  # Identity 1 is identity 0 shifted by 100: every min_{q!=p} term is far inside the margin.
  o = np.array([[0, 0], [1, 0], [100, 0], [101, 0]], np.float32)
  n = np.array([[0.5, 0], [0, 0.05], [100.5, 0], [100, 0.05]], np.float32)
  labels = np.array([7, 7, 3, 3])
  modality = np.array([0, 1, 0, 1])
  value, (g_o, g_n) = jax.jit(jax.value_and_grad(losses.center_nuances_mining, argnums=(0, 1)))(o, n, labels, modality)
  # mean_p (0.2 + 0) / 2, exact in float32: centres of one image each, d = 0.5 from 0.25, d(c2,c3) - d(c1,c3) = 0,
  # the inactive hinges exactly 0, halvings: float32(0.2) / 2 = float32(0.1).
  np.testing.assert_array_equal(value, np.float32(0.1))
  # The float64 reference gives 0.1: one float32 rounding (the margin's) apart.
  np.testing.assert_allclose(value, _np_cnm(o.astype(np.float64), n.astype(np.float64), labels, modality, 0.2),
                             rtol=U)
  g_o, g_n = np.asarray(g_o), np.asarray(g_n)
  # o_v enters only sg(d(c1,c3)) (and hinges that are off): zero gradient; so does the nuance infrared.
  np.testing.assert_array_equal(g_o[modality == 0], 0.0)
  np.testing.assert_array_equal(g_n[modality == 1], 0.0)
  # d(c2,c3) = |o_i - n_v| is active: weight 1/2 in (L123 + L124)/2, 1/2 in the mean over 2 identities,
  # along the unit direction (1, 0); one image per center. Every factor is a power of two: exact in float32.
  np.testing.assert_array_equal(g_o[modality == 1], [[0.25, 0], [0.25, 0]])
  np.testing.assert_array_equal(g_n[modality == 0], [[-0.25, 0], [-0.25, 0]])


def test_cnm_random_batches_match_numpy_and_are_nonnegative():
  fn = jax.jit(losses.center_nuances_mining)  # the margin traced: one program per batch size, not per margin.
  for seed in range(6):
    o, labels, modality = _batch(seed, scale=0.3)
    n = o + np.random.default_rng(seed + 50).normal(size=o.shape).astype(np.float32) * 0.3
    if seed % 3 == 0:  # unbalanced: one identity loses two of its images
      keep = np.ones(len(labels), bool)
      keep[np.flatnonzero(labels == labels[-1])[:2]] = False
      o, n, labels, modality = o[keep], n[keep], labels[keep], modality[keep]
    if seed % 2:  # one identity without infrared images in the batch, another with one image only
      lost = labels[0]
      modality = np.where((labels == lost) & (modality == 1), 0, modality)
      other = labels[labels != lost][0]
      idx = np.flatnonzero((labels == other) & (modality == 0))
      modality[idx[1:]] = 1
    for margin in (0.2, 2.0):
      value = fn(o, n, labels, modality, margin=margin)
      assert float(value) >= 0.0
      # Centres (means of <= 3 features, |x| <= 1.4), their distances over D = 6, 6 hinges per identity: worst
      # case 4.7e-6 relative (losses 0.64 .. 4.9); atol for a loss near 0 (every hinge at its kink).
      np.testing.assert_allclose(value, _np_cnm(o.astype(np.float64), n.astype(np.float64), labels, modality,
                                                margin), rtol=LOSS_RTOL, atol=1e-6)


def test_cnm_needs_two_complete_identities():
  o, labels, modality = _batch(3, num_ids=2)
  modality = np.where(labels != labels[0], 0, modality)  # the second identity has no infrared image
  value, grad = jax.jit(jax.value_and_grad(losses.center_nuances_mining))(o, o * 2, labels, modality)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_orthogonality():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(2, 5, 7)).astype(np.float32)
  # 7-term dot products (sum |a_i b_i| <= 4.2), their mean over 5: worst case 1.3e-6 relative of the value -1.6.
  np.testing.assert_allclose(jax.jit(losses.orthogonality)(a, b), np.mean([a[i] @ b[i] for i in range(5)]),
                             rtol=LOSS_RTOL)


def _config(**kwargs):
  base = dict(id_weight=1.0, label_smoothing=0.0, triplet="hard", triplet_weight=1.0, triplet_margin=0.3,
              cnm_weight=0.8, cnm_margin=0.2, ortho_weight=0.0)
  base.update(kwargs)
  return types.SimpleNamespace(**base)


def _jit_total_loss(cfg):
  """total_loss with the config closed over, jitted: one compiled program instead of one per op."""
  return jax.jit(lambda outputs, labels, modality: losses.total_loss(outputs, labels, modality, cfg))


def _outputs(seed, branches, nuances, parts=0, num_classes=6):
  x, labels, modality = _batch(seed)
  rng = np.random.default_rng(seed + 100)
  b, d = x.shape
  r = branches * (1 + parts)
  features = rng.normal(size=(r, b, d)).astype(np.float32)
  return {
      "global": x,
      "nuances": rng.normal(size=(nuances, b, d)).astype(np.float32),
      "features": features,
      "part_features": features[branches:].reshape(parts, branches, b, d),
      "logits": rng.normal(size=(r, b, num_classes)).astype(np.float32),
  }, labels % num_classes, modality


def test_total_loss_weighting_with_nuances():
  outputs, labels, modality = _outputs(5, branches=2, nuances=2)
  cfg = _config(id_weight=0.7, label_smoothing=0.1, triplet_weight=1.3, cnm_weight=0.8, ortho_weight=0.05)
  total, terms = _jit_total_loss(cfg)(outputs, labels, modality)
  ce = np.mean([_np_cross_entropy(l, labels, 0.1) for l in outputs["logits"]])
  tri = _np_batch_hard(np.concatenate(list(outputs["features"])), np.tile(labels, 2), 0.3)
  cnm = sum(_np_cnm(outputs["global"].astype(np.float64), nu.astype(np.float64), labels, modality, 0.2)
            for nu in outputs["nuances"])
  ort = np.mean(np.sum(outputs["nuances"][0] * outputs["nuances"][1], axis=1))
  # Worst cases (relative): id 2.5e-6, triplet 4.2e-6, cnm 7.8e-6, ortho 4.8e-6 (of -0.73: 24-term mean of
  # 6-term dot products); atol for a term near 0.
  np.testing.assert_allclose([terms["id"], terms["triplet"], terms["cnm"], terms["ortho"]], [ce, tri, cnm, ort],
                             rtol=LOSS_RTOL, atol=1e-6)
  # The terms' bounds and the float32 weights: worst case 4.8e-6 relative.
  np.testing.assert_allclose(total, 0.7 * ce + 1.3 * tri + 0.8 * cnm + 0.05 * ort, rtol=LOSS_RTOL)
  np.testing.assert_array_equal(terms["total"], total)  # the same value


def test_total_loss_without_nuances_wrt_and_parts():
  outputs, labels, modality = _outputs(6, branches=1, nuances=0, parts=2)
  total, terms = _jit_total_loss(_config(triplet="wrt", ortho_weight=1.0))(outputs, labels, modality)
  assert float(terms["cnm"]) == 0.0 and float(terms["ortho"]) == 0.0
  tri = np.mean([_np_wrt(f, labels) for f in outputs["features"]])  # one group per stripe and the global
  np.testing.assert_allclose(terms["triplet"], tri, rtol=WRT_RTOL)  # three WRT losses (WRT_RTOL), their mean
  # NumPy's float32 add (the same IEEE sum) rather than an eager jax add, which compiles a program: total is
  # 1.0 * id + 1.0 * triplet plus exact zeros (no nuances), one rounding of the same two float32 values.
  np.testing.assert_array_equal(total, np.asarray(terms["id"]) + np.asarray(terms["triplet"]))
  with pytest.raises(ValueError, match="loss.triplet"):
    losses.total_loss(outputs, labels, modality, _config(triplet="soft"))


def test_total_loss_under_jit_and_grad():
  outputs, labels, modality = _outputs(7, branches=3, nuances=2)
  cfg = _config(ortho_weight=0.01)
  fn = jax.jit(jax.grad(lambda o: losses.total_loss(o, labels, modality, cfg)[0]))
  grads = fn(outputs)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  assert np.any(np.asarray(grads["nuances"]) != 0.0)
