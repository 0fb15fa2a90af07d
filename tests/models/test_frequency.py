"""Tests of AGP and ANM (fdnm_jax/models/frequency.py) against NumPy FFT references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax.models import FDNM
from fdnm_jax.models import frequency
from fdnm_jax.models import spectral
from tests.models.test_spectral import np_guarded_polar

# The float32 error model of the small-map checks (as test_agp_on_post_relu_maps_at_layer1_sizes reads it for
# large maps): a float32 2-D FFT or DFT product of an H x W map rounds each bin by ~u log2(HW) of the map's rms
# (u = 2^-24; its rms error, not a worst case). Put on the input map as noise of that rms, it moves each float64
# reference's outputs by the spread quoted at each assertion (mean and maximum over 40 draws); the inverse
# transform's own rounding is of the same size, but no norm amplifies it.
# ANM's small-map checks against float64 (6 x 5 post-ReLU maps): under that model their outputs move by 5-8e-6
# on average and up to 1.9e-5 (the instance norms' gains, scale / std over the 6 x 3 amplitude grid, reach 18, the
# BNs' 5.2); twice that maximum.
ANM_SMALL_ATOL = 4e-5


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


def _jit_init(module, x, seed=0):
  """`module.init` under jax.jit: one compiled program instead of one per eager op of the forward pass."""
  return jax.jit(module.init)(jax.random.key(seed), x)


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
  variables = _jit_init(agp, x, 1)
  kernel = _gate_kernel(variables["params"], 4)
  assert kernel.shape == (shape[-1], shape[-1])
  y = jax.jit(agp.apply)(variables, x)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  # The error model (module note) moves y by 1.7e-6 on average, 2.1e-6 at most (HW <= 35, |x| <= 3); the inverse
  # adds ~u log2(35) of |y| <= 2.8 (9e-7): 1e-5 leaves 3.4x.
  np.testing.assert_allclose(np.asarray(y), _np_agp(x, kernel), atol=1e-5)


def test_agp_gate_zero_is_identity_and_gate_one_doubles_phase():
  x = np.random.default_rng(1).uniform(0.0, 1.0, size=(2, 7, 5, 8)).astype(np.float32)
  agp = frequency.AGP(groups=2)
  variables = _jit_init(agp, x)
  apply = jax.jit(agp.apply)
  # Mean amplitudes are > 0, so huge kernels saturate the sigmoid to exactly 0 or 1.
  closed = jax.tree.map(lambda k: jnp.full_like(k, -1e4), variables)
  y = apply(closed, x)
  # A transform pair of |x| <= 1 (gate 0), and the turn by P (gate 1, |y| <= 1.5): the error model (module note)
  # moves them by <= 7e-7 and 1.2e-6, the inverse adds <= 5e-7: 1e-5 leaves 5x.
  np.testing.assert_allclose(np.asarray(y), x, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y), _np_agp(x, None, gate=np.zeros((2, 8))), atol=1e-5)
  opened = jax.tree.map(lambda k: jnp.full_like(k, 1e4), variables)
  np.testing.assert_allclose(np.asarray(apply(opened, x)), _np_agp(x, None, gate=np.ones((2, 8))),
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
  variables = _randomise_norms(_jit_init(anm, f), 3)
  p = variables["params"]
  assert set(p) == {"conv1", "conv2", "inorm1", "inorm2", "bn"}
  (f1, f2), updated = jax.jit(lambda v, x: anm.apply(v, x, train=True, mutable=["batch_stats"]))(variables, f)
  ref1, ref2 = _np_anm(f, p)
  # The error model (module note), amplified by the instance norms' 1/std over the 6 x 3 amplitude grid (gain
  # <= 10.5) and the BN's (<= 2), moves the outputs by 2.8e-6 on average, 5e-6 at most (eval: 3e-6, 4.3e-6):
  # 1e-5 leaves 2x.
  np.testing.assert_allclose(np.asarray(f1), ref1, atol=1e-5)
  np.testing.assert_allclose(np.asarray(f2), ref2, atol=1e-5)
  # One BN shared by the branches: its running averages are updated once per branch.
  y = [_np_irfft2(_np_instance_norm(np.abs(_np_rfft2(f)) @ np.asarray(p[f"conv{i}"]["kernel"], np.float64),
                                    p[f"inorm{i}"]["scale"], p[f"inorm{i}"]["bias"])
                  * np.exp(1j * np.angle(_np_rfft2(f))), 6, 4) for i in (1, 2)]
  mean = np.asarray(variables["batch_stats"]["bn"]["mean"], np.float64)
  for yi in y:
    mean = 0.9 * mean + 0.1 * yi.mean(axis=(0, 1, 2))
  # The batch means enter with weight 0.09 + 0.1: 0.19 of the maps' error (<= 5e-6, above) and of the 72-term
  # means' rounding (72 u of mean |y| < 1): <= 2e-6; 1e-5 leaves 5x.
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["bn"]["mean"]), mean, atol=1e-5)

  e1, e2 = jax.jit(lambda v, x: anm.apply(v, x, train=False))(variables, f)
  ref1, ref2 = _np_anm(f, p, stats=variables["batch_stats"]["bn"])
  np.testing.assert_allclose(np.asarray(e1), ref1, atol=1e-5)
  np.testing.assert_allclose(np.asarray(e2), ref2, atol=1e-5)


@pytest.mark.parametrize("transform", frequency.SPECTRAL_TRANSFORMS)
def test_gradients_finite_for_all_zero_map(transform):
  zeros = jnp.zeros((2, 6, 4, 8), jnp.float32)
  agp = frequency.AGP(groups=4, transform=transform)
  agp_vars = _jit_init(agp, zeros)
  anm = frequency.ANM(transform=transform)
  anm_vars = _jit_init(anm, zeros)

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
  agp_vars = _jit_init(agp, x)
  assert jax.jit(agp.apply)(agp_vars, x).dtype == jnp.bfloat16
  anm = frequency.ANM(dtype=jnp.bfloat16)
  anm_vars = _jit_init(anm, x)
  assert all(o.dtype == jnp.bfloat16 for o in jax.jit(anm.apply)(anm_vars, x))

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


# --- Phase guards, conjugate pairs and ANM normalisation (issue 19) -------------------------------------------

# The guard settings the layer tests run: the spec, and the phase floor with conjugate pairs.
GUARDS = {"exact": dict(phase_guard="exact"),
          "floor_pairs": dict(phase_guard="floor", phase_floor=1e-4, conjugate_pairs=True)}


def _np_guard_kwargs(kw):
  return dict(guard=kw.get("phase_guard", "exact"), floor=kw.get("phase_floor", 1e-4),
              soft_eps=kw.get("phase_soft_eps", 1e-4), conjugate_pairs=kw.get("conjugate_pairs", False),
              cut=kw.get("phase_cut", "arctan2"))


def _np_agp_guarded(x, kernel, kw):
  """AGP (FDNM_SPEC §1.2) in NumPy float64 on the guarded reading of X: irfft2(A e^{iP} e^{i P s})."""
  spec = _np_rfft2(x)
  p = np_guarded_polar(spec, x.shape[2], **_np_guard_kwargs(kw))
  gate = 1.0 / (1.0 + np.exp(-(p["amplitude"].mean(axis=(1, 2)) @ kernel)))
  return _np_irfft2(p["carrier"] * np.exp(1j * p["phase"] * gate[:, None, None, :]), x.shape[1], x.shape[2])


def _np_anm_guarded(f, params, kw, bn_mode="reference", inorm_stats="instance", stats=None):
  """ANM (FDNM_SPEC §1.3) in NumPy float64 for each bn_mode; `stats` maps a BN name to its running (mean, var)."""
  p = np_guarded_polar(_np_rfft2(f), f.shape[2], **_np_guard_kwargs(kw))
  maps = []
  for i in (1, 2):
    mixed = p["amplitude"] @ np.asarray(params[f"conv{i}"]["kernel"], np.float64)
    grid = mixed.reshape(mixed.shape[0], -1, mixed.shape[-1])
    if inorm_stats == "exclude_dc":
      grid = grid[:, 1:]
    mean, var = grid.mean(axis=1)[:, None, None], grid.var(axis=1)[:, None, None]
    mixed = (mixed - mean) / np.sqrt(var + 1e-5) * params[f"inorm{i}"]["scale"] + params[f"inorm{i}"]["bias"]
    maps.append(_np_irfft2(mixed * p["phasor"], f.shape[1], f.shape[2]))

  def bn(y, name, batch):
    mean, var = (batch.mean(axis=(0, 1, 2)), batch.var(axis=(0, 1, 2))) if stats is None else stats[name]
    return (y - mean) / np.sqrt(var + 1e-5) * params[name]["scale"] + params[name]["bias"]

  if bn_mode == "reference":
    return [bn(y, "bn", y) for y in maps]
  if bn_mode == "joint":
    joint = np.concatenate(maps)
    return [bn(y, "bn", joint) for y in maps]
  if bn_mode == "per_branch":
    return [bn(y, f"bn{i}", y) for i, y in zip((1, 2), maps)]
  return maps


def _post_relu(seed, shape):
  return np.maximum(np.random.default_rng(seed).normal(size=shape), 0.0).astype(np.float32)


@pytest.mark.parametrize("guard", sorted(GUARDS))
@pytest.mark.parametrize("height,width", [(72, 36), (96, 36)])  # layer1 at 288 x 144 and 384 x 144
def test_agp_on_post_relu_maps_at_layer1_sizes(height, width, guard):
  x = _post_relu(height, (2, height, width, 8))
  agp = frequency.AGP(groups=4, **GUARDS[guard])
  variables = _jit_init(agp, x)
  y = jax.jit(agp.apply)(variables, x)
  # y is O(1); float32 FFTs of 2592-3456 points round to ~1e-6 relative (u log2(HW)), 1e-5 leaves margin.
  np.testing.assert_allclose(y, _np_agp_guarded(x, _gate_kernel(variables["params"], 4), GUARDS[guard]), atol=1e-5)


@pytest.mark.parametrize("guard", sorted(GUARDS))
@pytest.mark.parametrize("height,width", [(18, 9), (24, 9)])  # layer4 at 288 x 144 and 384 x 144
def test_anm_on_post_relu_maps_at_layer4_sizes(height, width, guard):
  f = _post_relu(height, (4, height, width, 16))
  anm = frequency.ANM(**GUARDS[guard])
  variables = _randomise_norms(_jit_init(anm, f), 1)
  (f1, f2), _ = jax.jit(lambda v, x: anm.apply(v, x, train=True, mutable=["batch_stats"]))(variables, f)
  ref = _np_anm_guarded(f, variables["params"], GUARDS[guard])
  # A bin's phase error is its float32 rounding (~1e-7 |X|_rms) over |X|, and the smallest of ~1e4
  # Rayleigh-distributed bins is ~1e-2 RMS: <= 1e-5 relative per bin, spread by irfft2 and scaled by the norms'
  # 1/std; 1e-4 of the map's scale bounds it.
  np.testing.assert_allclose(f1, ref[0], atol=1e-4 * np.abs(ref[0]).max())
  np.testing.assert_allclose(f2, ref[1], atol=1e-4 * np.abs(ref[1]).max())


@pytest.mark.parametrize("transform", frequency.SPECTRAL_TRANSFORMS)
@pytest.mark.parametrize("guard", sorted(GUARDS))
@pytest.mark.parametrize("height,width", [(1, 8), (2, 8), (4, 4), (8, 4)])
def test_agp_with_the_principal_cut_reads_bins_on_the_cut_as_numpy_on_maps_with_zero_odd_columns(height, width,
                                                                                                  guard, transform):
  # A post-ReLU map whose odd columns are zero in some channels puts bins of the other columns exactly on the
  # negative real axis (W = 4: X[u, 1] sums c0 - c2 + i (c3 - c1) over rows): with arctan2 AGP turns them by
  # -pi s or +pi s as the sign of a zero or of rounding noise says (NumPy's FFT gives some -0.0, dft_matmul's
  # matrices noise of either sign: they disagree by O(1)). phase_cut="principal" reads them as +pi
  # (`spectral.principal_angle`). At these power-of-two sizes every transform computes those bins' imaginary
  # parts as exact zeros or noise far below the angle's float32 step, so the float32 layer matches NumPy's float64
  # to its rounding (1e-5 of the map's scale, as above).
  x = _post_relu(10 * height + width, (4, height, width, 8))
  x[:, :, 1::2, ::2] = 0.0
  spec = _np_rfft2(x)
  on_cut = (spec.imag == 0) & (spec.real < 0)
  on_cut[:, :, list(spectral.self_conjugate_columns(width))] = False
  assert on_cut.sum() >= 4  # the map puts bins on the cut (checked, not assumed)
  kw = dict(GUARDS[guard], phase_cut="principal")
  agp = frequency.AGP(groups=4, transform=transform, **kw)
  variables = _jit_init(agp, x)
  y = jax.jit(agp.apply)(variables, x)
  ref = _np_agp_guarded(x, _gate_kernel(variables["params"], 4), kw)
  np.testing.assert_allclose(y, ref, atol=1e-5 * np.abs(ref).max())


def _structured_maps(height, width, channels=12):
  """Maps whose spectra have exact zeros and real bins: constant along H, along W, flat, a negative Nyquist."""
  rng = np.random.default_rng(height + width)
  x = np.zeros((2, height, width, channels))
  c = np.arange(channels)
  x += rng.uniform(0.0, 1.0, (2, 1, width, channels)) * (c % 4 == 0)  # constant along H
  x += rng.uniform(0.0, 1.0, (2, height, 1, channels)) * (c % 4 == 1)  # constant along W
  x += 0.7 * (c % 4 == 2)  # flat
  alternating = (-1.0) ** np.arange(width)[None, None, :, None]
  x += (0.5 - 0.3 * alternating) * (c % 4 == 3)  # negative Nyquist column (W even)
  return x.astype(np.float32)


@pytest.mark.parametrize("height,width", [(24, 10), (18, 8)])
def test_fft_and_dft_matmul_agree_on_structured_maps_with_floor_and_pairs(height, width):
  x = _structured_maps(height, width)
  kw = GUARDS["floor_pairs"]
  agp = {t: frequency.AGP(groups=4, transform=t, **kw) for t in frequency.SPECTRAL_TRANSFORMS}
  anm = {t: frequency.ANM(transform=t, **kw) for t in frequency.SPECTRAL_TRANSFORMS}
  agp_vars = _jit_init(agp["fft"], x)
  anm_vars = _randomise_norms(_jit_init(anm["fft"], x), 2)
  y = {t: jax.jit(m.apply)(agp_vars, x) for t, m in agp.items()}
  f = {t: jax.jit(lambda v, x, m=m: m.apply(v, x, train=True, mutable=["batch_stats"])[0])(anm_vars, x)
       for t, m in anm.items()}
  # The two transforms differ by float32 rounding (~1e-7 relative, `test_dft_matmul_transforms_match_numpy_fft`);
  # with the noise bins floored no phase amplifies it, so the maps agree to 1e-5 of their scale (ANM's norms
  # scale its rounding by their 1/std, a few x 1e-6 relative; an unguarded noise phase gives O(1) differences).
  np.testing.assert_allclose(y["fft"], y["dft_matmul"], atol=1e-5 * np.abs(y["fft"]).max())
  for a, b in zip(f["fft"], f["dft_matmul"]):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max())


def _central_difference(fn, x, direction, step):
  return (fn(x + step * direction) - fn(x - step * direction)) / (2.0 * step)


@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_gradients_match_float64_finite_differences_away_from_the_cut(guard):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 7, 6, 8)).astype(np.float32)
  spec = _np_rfft2(x)
  off_axis = np.ones(spec.shape[1:3], bool)
  off_axis[0, [0, x.shape[2] // 2]] = False  # the real bins (odd H): no jump there (spectral.near_cut_fraction)
  assert np.min(np.pi - np.abs(np.angle(spec[:, off_axis]))) > 1e-3  # away from AGP's cut (checked, not assumed)
  direction = rng.normal(size=x.shape)
  weights = rng.normal(size=x.shape)
  agp = frequency.AGP(groups=4, **GUARDS[guard])
  agp_vars = _jit_init(agp, x)
  anm = frequency.ANM(**GUARDS[guard])
  anm_vars = _randomise_norms(_jit_init(anm, x), 4)
  kernel = _gate_kernel(agp_vars["params"], 4)
  cases = [
      (lambda v: jnp.sum(weights * agp.apply(agp_vars, v)),
       lambda v: np.sum(weights * _np_agp_guarded(v, kernel, GUARDS[guard]))),
      (lambda v: jnp.sum(weights * anm.apply(anm_vars, v, train=True, mutable=["batch_stats"])[0][1]),
       lambda v: np.sum(weights * _np_anm_guarded(v, anm_vars["params"], GUARDS[guard])[1])),
  ]
  for loss, np_loss in cases:
    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)), np.float64)
    analytic = np.sum(grad * direction)
    # float64 central differences: truncation ~ step^2 |L'''| and rounding ~ 1e-16 |L| / step, both < 1e-8 here;
    # the float32 gradient sums ~1e3 terms of relative error ~1e-6: 1e-4 relative bounds it.
    numeric = _central_difference(lambda v: np_loss(v), x.astype(np.float64), direction, 1e-5)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)


def _batch_stats_of(f, params, kw, bn_mode, inorm_stats):
  """The BN batch statistics training uses, from the NumPy reference (biased variance, as the BN's running var)."""
  maps = _np_anm_guarded(f, params, kw, bn_mode="none", inorm_stats=inorm_stats)
  if bn_mode == "joint":
    joint = np.concatenate(maps)
    return {"bn": (joint.mean(axis=(0, 1, 2)), joint.var(axis=(0, 1, 2)))}
  return {f"bn{i}": (y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))) for i, y in zip((1, 2), maps)}


@pytest.mark.parametrize("inorm_stats", frequency.ANM_INORM_STATS)
@pytest.mark.parametrize("bn_mode", frequency.ANM_BN_MODES)
def test_anm_bn_modes_match_numpy_and_eval_equals_train_at_batch_statistics(bn_mode, inorm_stats):
  f = _post_relu(11, (4, 6, 5, 8))
  kw = GUARDS["floor_pairs"]
  anm = frequency.ANM(bn_mode=bn_mode, inorm_stats=inorm_stats, **kw)
  variables = _randomise_norms(_jit_init(anm, f), 5)
  train = jax.jit(lambda v, x: anm.apply(v, x, train=True, mutable=["batch_stats"]))
  evaluate = jax.jit(lambda v, x: anm.apply(v, x, train=False))
  names = {"reference": {"bn"}, "joint": {"bn"}, "per_branch": {"bn1", "bn2"}, "none": set()}[bn_mode]
  assert set(variables["params"]) == {"conv1", "conv2", "inorm1", "inorm2"} | names
  (t1, t2), _ = train(variables, f)
  ref = _np_anm_guarded(f, variables["params"], kw, bn_mode, inorm_stats)
  np.testing.assert_allclose(t1, ref[0], atol=ANM_SMALL_ATOL)
  np.testing.assert_allclose(t2, ref[1], atol=ANM_SMALL_ATOL)
  if bn_mode == "reference":
    # One BN, two batch statistics in training, one running average: no running value reproduces both
    # branches (here: set to branch 1's, branch 2 differs by the branches' different statistics).
    stats = _batch_stats_of(f, variables["params"], kw, "per_branch", inorm_stats)
    mean, var = stats["bn1"]
    assert np.max(np.abs(stats["bn2"][0] - mean)) > 1e-2
    variables = {**variables, "batch_stats": {"bn": {"mean": mean, "var": var}}}
    e1, e2 = evaluate(variables, f)
    # Branch 1 in eval (branch 1's float64 statistics) and in training are each within ANM_SMALL_ATOL of the float64
    # reference of those statistics, as below.
    np.testing.assert_allclose(e1, t1, atol=2 * ANM_SMALL_ATOL)
    assert np.max(np.abs(np.asarray(e2) - np.asarray(t2))) > 1e-2
    return
  if names:
    stats = _batch_stats_of(f, variables["params"], kw, bn_mode, inorm_stats)
    variables = {**variables, "batch_stats": {n: {"mean": stats[n][0], "var": stats[n][1]} for n in names}}
  e1, e2 = evaluate(variables, f)
  # Eval normalises with the float64 batch statistics, training with float32 ones: each is within ANM_SMALL_ATOL of
  # the float64 reference with those statistics (eval's error is its maps' alone), so they are within twice that.
  np.testing.assert_allclose(e1, t1, atol=2 * ANM_SMALL_ATOL)
  np.testing.assert_allclose(e2, t2, atol=2 * ANM_SMALL_ATOL)


def _hermitian_spectrum(rng, height, width, channels):
  return _np_rfft2(rng.normal(size=(1, height, width, channels)))


def _anti_hermitian_noise(rng, shape, width, scale):
  """Noise on the self-conjugate columns that leaves their Hermitian part unchanged: +d at (u, k), -conj d at -u."""
  height = shape[1]
  noise = np.zeros(shape, np.complex128)
  mirror = (-np.arange(height)) % height
  for k in (0, width // 2):
    d = scale * (rng.normal(size=(shape[0], height, shape[3])) + 1j * rng.normal(size=(shape[0], height, shape[3])))
    noise[:, :, k] = d - np.conj(d[:, mirror])
  return noise


def _run_on_spectra(monkeypatch, module, variables, specs, height, width, **kwargs):
  """module.apply with rfft2 returning each of `specs`: one jitted program (rfft2 patched while it traces)."""
  def run(variables, re, im):
    with monkeypatch.context() as patch:
      patch.setattr(spectral, "rfft2", lambda x, transform="fft": (re, im))
      return module.apply(variables, jnp.zeros((re.shape[0], height, width, re.shape[-1])), **kwargs)

  run = jax.jit(run)
  return [run(variables, spec.real, spec.imag) for spec in (s.astype(np.complex64) for s in specs)]


@pytest.mark.parametrize("layer", ["agp", "anm"])
def test_conjugate_pairs_make_irfft2_blind_to_rounding_noise_in_the_self_conjugate_columns(layer, monkeypatch):
  height, width, channels = 8, 6, 8
  rng = np.random.default_rng(13)
  spec = _hermitian_spectrum(rng, height, width, channels)
  if layer == "agp":
    # Column-0 pairs just off the negative real axis (phase pi - 1e-6): rounding noise moves each half across.
    spec[0, 1:, 0] = -np.abs(spec[0, 1:, 0]) * np.exp(1j * 1e-6 * np.sign(height / 2 - np.arange(1, height)))[:, None]
    spec[0, height // 2, 0] = -1.0
  else:
    spec[0, 1:, 0] *= 1e-9  # rounding-noise bins: ANM's exact phasor is their noise's
  noise = _anti_hermitian_noise(rng, spec.shape, width, 3e-6 if layer == "agp" else 3e-9)
  outputs = {}
  for pairs in (False, True):
    module = (frequency.AGP(groups=2, conjugate_pairs=pairs) if layer == "agp"
              else frequency.ANM(bn_mode="none", conjugate_pairs=pairs))
    variables = _randomise_norms(_jit_init(module, np.zeros((1, height, width, channels), np.float32)), 6)
    kwargs = {} if layer == "agp" else {"train": False}
    clean, noisy = _run_on_spectra(monkeypatch, module, variables, (spec, spec + noise), height, width, **kwargs)
    clean, noisy = (clean, noisy) if layer == "agp" else (clean[0], noisy[0])
    outputs[pairs] = float(np.max(np.abs(np.asarray(clean) - np.asarray(noisy))))
  # With pairs: only float32 rounding of O(1) maps changes (1e-5); without: a jump of O(|X|) = O(1).
  assert outputs[True] < 1e-5, outputs
  assert outputs[False] > 1e-2, outputs
