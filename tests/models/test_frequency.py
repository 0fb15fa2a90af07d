"""Tests of AGP and ANM (fdnm_jax/models/frequency.py) against NumPy FFT references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax.models import FDNM
from fdnm_jax.models import frequency


def _np_rfft2(x):
  return np.fft.rfft2(x.astype(np.float64), axes=(1, 2), norm="ortho")


def _np_irfft2(spec, h, w):
  return np.fft.irfft2(spec, s=(h, w), axes=(1, 2), norm="ortho")


def _np_agp(x, gate_kernel, gate=None):
  """FDNM_SPEC §1.2 in NumPy float64; `gate` overrides s = sigmoid(W a) when given."""
  spec = _np_rfft2(x)
  amp, phase = np.abs(spec), np.angle(spec)
  if gate is None:
    gate = 1.0 / (1.0 + np.exp(-(amp.mean(axis=(1, 2)) @ gate_kernel)))
  new_phase = phase * gate[:, None, None, :] + phase
  return _np_irfft2(amp * np.exp(1j * new_phase), x.shape[1], x.shape[2])


def _np_instance_norm(x, scale, bias):
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_anm(f, p, stats=None):
  """FDNM_SPEC §1.3 in NumPy float64; batch statistics in the BN unless `stats` is given."""
  spec = _np_rfft2(f)
  amp, phase = np.abs(spec), np.angle(spec)
  outs = []
  for i in (1, 2):
    a = _np_instance_norm(amp @ np.asarray(p[f"conv{i}"]["kernel"], np.float64),
                          p[f"inorm{i}"]["scale"], p[f"inorm{i}"]["bias"])
    y = _np_irfft2(a * np.exp(1j * phase), f.shape[1], f.shape[2])
    mean, var = (y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))) if stats is None else (stats["mean"], stats["var"])
    outs.append((y - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"])
  return outs


def _gate_kernel(params, groups):
  return np.concatenate([np.asarray(params[f"gate_{g}"]["kernel"], np.float64) for g in range(groups)], axis=1)


# Odd H, W: the only real-valued bin is DC, whose phase 0 / pi is exact in float32 and float64
# (Nyquist bins of even sizes carry +-0 rounding noise in their imaginary part, and the spec's
# P * (1 + s) is discontinuous across the negative real axis).
@pytest.mark.parametrize("transform", frequency.SPECTRAL_TRANSFORMS)
@pytest.mark.parametrize("shape", [(2, 7, 5, 8), (3, 9, 3, 12)])
def test_agp_matches_numpy(shape, transform):
  x = np.random.default_rng(0).uniform(0.0, 2.0, size=shape).astype(np.float32)
  x[0, ..., 0] -= 3.0  # a channel with a negative DC bin (phase pi)
  agp = frequency.AGP(groups=4, transform=transform)
  variables = agp.init(jax.random.key(1), x)
  kernel = _gate_kernel(variables["params"], 4)
  assert kernel.shape == (shape[-1], shape[-1])
  y = agp.apply(variables, x)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y), _np_agp(x, kernel), atol=1e-5)


def test_agp_gate_zero_is_identity_and_gate_one_doubles_phase():
  x = np.random.default_rng(1).uniform(0.0, 1.0, size=(2, 7, 5, 8)).astype(np.float32)
  agp = frequency.AGP(groups=2)
  variables = agp.init(jax.random.key(0), x)
  # Mean amplitudes are > 0, so huge kernels saturate the sigmoid to exactly 0 or 1.
  closed = jax.tree.map(lambda k: jnp.full_like(k, -1e4), variables)
  y = agp.apply(closed, x)
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y), _np_agp(x, None, gate=np.zeros((2, 8))), atol=1e-5)
  opened = jax.tree.map(lambda k: jnp.full_like(k, 1e4), variables)
  np.testing.assert_allclose(np.asarray(agp.apply(opened, x)), _np_agp(x, None, gate=np.ones((2, 8))),
                             atol=1e-5)


def _randomise_norms(variables, seed):
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
    return leaf
  return jax.tree_util.tree_map_with_path(fill, variables)


@pytest.mark.parametrize("transform", frequency.SPECTRAL_TRANSFORMS)
def test_anm_matches_numpy_train_and_eval(transform):
  f = np.random.default_rng(2).normal(size=(3, 6, 4, 8)).astype(np.float32)
  anm = frequency.ANM(bn_momentum=0.9, transform=transform)
  variables = _randomise_norms(anm.init(jax.random.key(0), f), 3)
  p = variables["params"]
  assert set(p) == {"conv1", "conv2", "inorm1", "inorm2", "bn"}
  (f1, f2), updated = anm.apply(variables, f, train=True, mutable=["batch_stats"])
  ref1, ref2 = _np_anm(f, p)
  np.testing.assert_allclose(np.asarray(f1), ref1, atol=1e-5)
  np.testing.assert_allclose(np.asarray(f2), ref2, atol=1e-5)
  # One BN shared by the branches: its running averages are updated once per branch.
  y = [_np_irfft2(_np_instance_norm(np.abs(_np_rfft2(f)) @ np.asarray(p[f"conv{i}"]["kernel"], np.float64),
                                    p[f"inorm{i}"]["scale"], p[f"inorm{i}"]["bias"])
                  * np.exp(1j * np.angle(_np_rfft2(f))), 6, 4) for i in (1, 2)]
  mean = np.asarray(variables["batch_stats"]["bn"]["mean"], np.float64)
  for yi in y:
    mean = 0.9 * mean + 0.1 * yi.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["bn"]["mean"]), mean, atol=1e-5)

  e1, e2 = anm.apply(variables, f, train=False)
  ref1, ref2 = _np_anm(f, p, stats=variables["batch_stats"]["bn"])
  np.testing.assert_allclose(np.asarray(e1), ref1, atol=1e-5)
  np.testing.assert_allclose(np.asarray(e2), ref2, atol=1e-5)


@pytest.mark.parametrize("transform", frequency.SPECTRAL_TRANSFORMS)
def test_gradients_finite_for_all_zero_map(transform):
  zeros = jnp.zeros((2, 6, 4, 8), jnp.float32)
  agp = frequency.AGP(groups=4, transform=transform)
  agp_vars = agp.init(jax.random.key(0), zeros)
  anm = frequency.ANM(transform=transform)
  anm_vars = anm.init(jax.random.key(0), zeros)

  def agp_loss(params, x):
    return jnp.sum(agp.apply({"params": params}, x) ** 2 + agp.apply({"params": params}, x))

  def anm_loss(params, x):
    (f1, f2), _ = anm.apply({"params": params, "batch_stats": anm_vars["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(f1 * jnp.arange(8.0)) + jnp.sum(f2 ** 2)

  for loss, params in ((agp_loss, agp_vars["params"]), (anm_loss, anm_vars["params"])):
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, zeros)
    assert np.isfinite(value)
    for g in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(g)))


def test_bfloat16_input_keeps_ffts_in_float32():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 6, 4, 8)), jnp.bfloat16)
  agp = frequency.AGP(groups=4)
  agp_vars = agp.init(jax.random.key(0), x)
  assert agp.apply(agp_vars, x).dtype == jnp.bfloat16
  anm = frequency.ANM(dtype=jnp.bfloat16)
  anm_vars = anm.init(jax.random.key(0), x)
  assert all(o.dtype == jnp.bfloat16 for o in anm.apply(anm_vars, x))

  model = FDNM(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, dtype=jnp.bfloat16, agp_stages=(1, 2),
               anm_stage=4)
  image = jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), image, image)
  fn = lambda var, v, i: model.apply(var, v, i, train=True, mutable=["batch_stats"])
  jaxpr = jax.make_jaxpr(fn)(variables, image, image)
  fft_dtypes = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "fft":
        fft_dtypes.append({str(v.aval.dtype) for v in list(eqn.invars) + list(eqn.outvars)})
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert len(fft_dtypes) == 2 * 2 + 1 + 2  # AGP x2: rfft + irfft; ANM: rfft + 2 irfft
  assert all(d <= {"float32", "complex64"} for d in fft_dtypes)
  out, _ = jax.eval_shape(fn, variables, image, image)
  assert all(v.dtype == jnp.float32 for v in out.values())


def _param_count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_resnet50_param_additions():
  image = jax.ShapeDtypeStruct((2, 288, 144, 3), jnp.float32)

  def params(**kwargs):
    model = FDNM(num_classes=395, **kwargs)
    return jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), image, image)

  base = params()
  assert _param_count(base["params"]) - _param_count(base["params"]["infrared_stem"]) == (
      23_508_032 + 2048 + 2048 * 395)  # torchvision resnet50 without fc + BNNeck scale + classifier
  agp = params(agp_stages=(1, 2))
  assert _param_count(agp["params"]) - _param_count(base["params"]) == 256 ** 2 + 512 ** 2 == 327_680
  assert _param_count(agp["params"]["agp1"]) == 256 ** 2
  anm = params(anm_stage=4)
  assert _param_count(anm["params"]) - _param_count(base["params"]) == 2 * 2048 ** 2 + 2 * 2 * 2048 + 2 * 2048
  assert _param_count(anm["batch_stats"]["anm"]) == 2 * 2048
