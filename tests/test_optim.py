"""The optimiser against PyTorch's SGD written out in NumPy, and the schedule against DEEN's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fdnm_jax import optim
from tests.rounding import U


def _schedule(**kw):
  s = default.get_config().schedule
  s.update(kw)
  return s


@pytest.mark.parametrize("epoch, expected", [
    (0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (19, 1.0), (20, 0.1), (79, 0.1), (80, 0.01), (149, 0.01)])
def test_lr_factor_follows_deen_rule(epoch, expected):
  # DEEN adjust_learning_rate: e<10: (e+1)/10; e<20: 1; e<80: 0.1; else 0.01.
  steps_per_epoch = 7
  factor = optim.lr_factor_fn(_schedule(), steps_per_epoch)
  traced = jax.jit(factor)  # as the optimiser calls it: on its step count, inside the train step.
  for step in (epoch * steps_per_epoch, epoch * steps_per_epoch + steps_per_epoch - 1):
    # The host's Python path (logging), float64: (e + 1) / 10 is one correctly rounded division and 0.1 ** 2 is
    # within 3 float64 roundings (3.3e-16) of 0.01.
    assert float(factor(step)) == pytest.approx(expected, rel=1e-15)
    # float32: (e + 1) / 10 is one rounding (u); jnp.power(0.1, 2), were it exp(2 log 0.1), errs by 2 x the log's
    # ~2 u of |log 0.1| = 2.3, plus the product's and exp's roundings: <= ~16 u; 1e-6 = 17 u.
    assert float(traced(jnp.asarray(step, jnp.int32))) == pytest.approx(expected, rel=17 * U)


def _torch_sgd(p, grads, lr, momentum, wd, nesterov):
  """PyTorch SGD: d = g + wd*p; buf = m*buf + d (buf = d at the first step); d = d + m*buf if nesterov."""
  buf = None
  for g in grads:
    d = g + wd * p
    buf = d.copy() if buf is None else momentum * buf + d
    d = d + momentum * buf if nesterov else buf
    p = p - lr * d
  return p


def test_sgd_matches_pytorch_with_two_lr_groups():
  cfg = default.get_config()
  sched = _schedule(warmup_epochs=0, decay_epochs=())
  tx = optim.make_optimizer(cfg.optim, sched, steps_per_epoch=1)
  rng = np.random.default_rng(0)
  params = {"layer1": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
            "bnneck": {"scale": rng.normal(size=(4,)).astype(np.float32)},
            "classifier": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)}}
  grads = [{k: {n: rng.normal(size=v.shape).astype(np.float32) for n, v in sub.items()}
            for k, sub in params.items()} for _ in range(3)]
  state = tx.init(params)
  p = {k: {n: jnp.asarray(v) for n, v in sub.items()} for k, sub in params.items()}
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = {k: {n: p[k][n] + updates[k][n] for n in sub} for k, sub in p.items()}
  for name, lr in (("layer1", 0.01), ("bnneck", 0.1), ("classifier", 0.1)):
    for n in params[name]:
      expected = _torch_sgd(params[name][n].astype(np.float64), [g[name][n] for g in grads], lr, 0.9, 5e-4, True)
      # 3 steps of 8 float32 roundings (u each) on |p| <= 2.7 and lr |update| <= 0.42, and the float32 lr, momentum
      # and weight decay: worst case 9e-7 absolute, 3.2e-6 relative; this tolerance is >= 5x that per element.
      np.testing.assert_allclose(np.asarray(p[name][n]), expected, rtol=1e-5, atol=1e-6)


def test_param_group_labels():
  labels = optim.param_group_labels({"bnneck": {"a": 1}, "bnneck_part0": {"a": 1}, "classifier": {"k": 1},
                                     "layer4": {"block0": {"k": 1}}, "visible_stem": {"k": 1}})
  assert labels == {"bnneck": {"a": "head"}, "bnneck_part0": {"a": "head"}, "classifier": {"k": "head"},
                    "layer4": {"block0": {"k": "backbone"}}, "visible_stem": {"k": "backbone"}}
