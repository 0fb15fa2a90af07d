"""CrossModalitySampler: batch composition, identity order, determinism per (seed, step), epoch length."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from input_pipeline.sampling import CrossModalitySampler

# ids 10..17 in both modalities (uneven counts); id 99 only visible, id 98 only infrared.
VIS = np.array([10, 10, 10, 11, 12, 12, 13, 14, 14, 14, 14, 15, 16, 17, 17, 99, 99])
IR = np.array([17, 16, 15, 14, 13, 12, 11, 10, 10, 11, 12, 13, 98])


def _check_batch(sampler, step, p, k):
  vis, ir = sampler.batch_indices(step)
  assert vis.shape == ir.shape == (p * k,)
  assert vis.dtype == ir.dtype == np.int64
  vis_ids, ir_ids = VIS[vis].reshape(p, k), IR[ir].reshape(p, k)
  # identity by identity: each row is one identity, K images of it, the same order in both modalities
  assert (vis_ids == vis_ids[:, :1]).all() and (ir_ids == ir_ids[:, :1]).all()
  np.testing.assert_array_equal(vis_ids[:, 0], ir_ids[:, 0])
  ids = vis_ids[:, 0]
  assert len(set(ids.tolist())) == p  # without replacement
  assert set(ids.tolist()) <= set(range(10, 18))  # only ids present in both modalities
  return ids


def test_batch_composition_and_order():
  sampler = CrossModalitySampler(VIS, IR, num_ids_per_batch=5, num_instances=3, seed=4)
  seen = set()
  for step in range(40):
    seen |= set(_check_batch(sampler, step, 5, 3).tolist())
  assert seen == set(range(10, 18))


def test_images_with_replacement():
  # identity 11 has one visible image: K = 4 copies of it
  sampler = CrossModalitySampler(VIS, IR, num_ids_per_batch=8, num_instances=4, seed=0)
  vis, _ = sampler.batch_indices(0)
  rows = VIS[vis].reshape(8, 4)[:, 0].tolist()
  assert vis.reshape(8, 4)[rows.index(11)].tolist() == [3, 3, 3, 3]


def test_pure_function_of_seed_and_step():
  a = CrossModalitySampler(VIS, IR, 4, 2, seed=7)
  b = CrossModalitySampler(VIS, IR, 4, 2, seed=7)
  for step in (5, 0, 123456789, 5):  # any order: no hidden state
    np.testing.assert_array_equal(np.concatenate(a.batch_indices(step)), np.concatenate(b.batch_indices(step)))
  batches = {tuple(np.concatenate(a.batch_indices(s)).tolist()) for s in range(20)}
  assert len(batches) == 20  # steps differ
  other = CrossModalitySampler(VIS, IR, 4, 2, seed=8)
  assert any(not np.array_equal(np.concatenate(a.batch_indices(s)), np.concatenate(other.batch_indices(s)))
             for s in range(3))


def test_steps_per_epoch():
  assert CrossModalitySampler(VIS, IR, 2, 2, 0).steps_per_epoch == math.ceil(17 / 4) == 5
  assert CrossModalitySampler(VIS, IR, 4, 4, 0).steps_per_epoch == 2
  assert CrossModalitySampler(VIS, IR, 8, 4, 0).steps_per_epoch == 1


def test_too_few_shared_identities():
  with pytest.raises(ValueError, match="Only 8 identities .* num_ids_per_batch=9"):
    CrossModalitySampler(VIS, IR, 9, 2, 0)
  with pytest.raises(ValueError, match="num_instances"):
    CrossModalitySampler(VIS, IR, 2, 0, 0)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 8), k=st.integers(1, 5), seed=st.integers(0, 2**31), step=st.integers(0, 2**40))
def test_composition_property(p, k, seed, step):
  _check_batch(CrossModalitySampler(VIS, IR, p, k, seed), step, p, k)
