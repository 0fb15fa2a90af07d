"""Tests of fdnm_jax/models/spectral.py: the transforms and the guarded polar form, against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax.models import spectral
from tests.rounding import U


def _np_rfft2(x):
  return np.fft.rfft2(x.astype(np.float64), axes=(1, 2), norm="ortho")


def _np_irfft2(spec, h, w):
  return np.fft.irfft2(spec, s=(h, w), axes=(1, 2), norm="ortho")


def np_principal_angle(spec):
  """angle(spec) in (-pi, pi], float64: np.angle reads a -0.0 imaginary part on the negative real axis as -pi."""
  angle = np.angle(spec)
  return np.where(angle <= -np.pi, angle + 2.0 * np.pi, angle)


def np_guarded_polar(spec, width, guard="exact", floor=1e-4, soft_eps=1e-4, conjugate_pairs=False, cut="arctan2"):
  """The guards of spectral.guarded_polar written from their definitions in NumPy float64.

  spec: complex [B, H, K, C]. Returns a dict of amplitude, phase, phasor (complex), carrier (complex), valid.
  """
  spec = np.array(spec, np.complex128)
  height = spec.shape[1]
  cols = [0, width // 2] if width % 2 == 0 else [0]
  mirror = (-np.arange(height)) % height
  if conjugate_pairs:
    for k in cols:
      spec[:, :, k] = 0.5 * (spec[:, :, k] + np.conj(spec[:, mirror, k]))
  power = np.abs(spec) ** 2
  valid = power > 1e-30
  mean_power = power.mean(axis=(1, 2), keepdims=True)
  if guard == "floor":
    valid &= np.sqrt(power) >= floor * np.sqrt(mean_power)
  amp = np.where(valid, np.abs(spec), 0.0)
  angle = np_principal_angle if cut == "principal" else np.angle
  phase = np.where(valid, angle(spec), 0.0)
  phasor = np.where(valid, spec / np.where(valid, amp, 1.0), 1.0)
  carrier = spec if guard == "exact" else np.where(valid, spec, 0.0)
  if guard == "reference":
    phase = np.where(valid, angle(spec + 1e-7), 0.0)
    phasor = np.exp(1j * phase)
    carrier = amp * phasor
  elif guard == "soft":
    phasor = spec / np.sqrt(power + soft_eps ** 2 * mean_power)
    carrier = amp * phasor
  out = {"amplitude": amp, "phase": phase, "phasor": phasor, "carrier": carrier, "valid": valid}
  if conjugate_pairs:
    rows = np.arange(height) > height / 2
    for name, value in out.items():
      for k in cols:
        source = value[:, mirror, k]
        if name == "phase":
          source = -source
        elif np.iscomplexobj(value):
          source = np.conj(source)
        value[:, rows, k] = source[:, rows]
  return out


def _spectrum_with_small_bins(seed, shape, floor):
  """A random half spectrum whose small bins are far below `floor` x RMS and the others far above it."""
  rng = np.random.default_rng(seed)
  spec = rng.normal(size=shape) + 1j * rng.normal(size=shape)
  spec *= np.where(np.abs(spec) < 0.2, 5.0, 1.0)  # no bin near the floor by chance: all |X| >= 0.2 x ...
  tiny = rng.random(shape) < 0.2
  spec[tiny] *= floor * 1e-2  # ... or far below floor x RMS
  return spec.astype(np.complex64)


@pytest.mark.parametrize("conjugate_pairs", [False, True])
@pytest.mark.parametrize("guard", spectral.PHASE_GUARDS)
@pytest.mark.parametrize("height,width", [(6, 8), (7, 5)])  # even H and W (self-conjugate Nyquist bins), odd
def test_guarded_polar_matches_its_numpy_definition(guard, conjugate_pairs, height, width):
  floor, soft_eps = 1e-3, 1e-2
  spec = _spectrum_with_small_bins(height, (2, height, width // 2 + 1, 3), floor)
  p = jax.jit(spectral.guarded_polar, static_argnums=(2, 3, 4, 5, 6))(
      spec.real, spec.imag, width, guard, floor, soft_eps, conjugate_pairs)
  p = jax.tree.map(np.asarray, p)  # NumPy: `re + 1j * im` below is then no eager JAX op to compile
  ref = np_guarded_polar(spec, width, guard, floor, soft_eps, conjugate_pairs)
  np.testing.assert_array_equal(p.valid, ref["valid"])
  # Every value is O(1) or smaller and a few float32 operations from the input: 1e-6 is a few float32 ulps.
  # The phase of a bin far below the floor (|X| ~ 1e-5) is still well-conditioned in float32 (relative inputs).
  np.testing.assert_allclose(p.amplitude, ref["amplitude"], atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(p.phase, ref["phase"], atol=1e-6)
  np.testing.assert_allclose(p.phasor_re + 1j * p.phasor_im, ref["phasor"], atol=1e-6)
  np.testing.assert_allclose(p.carrier_re + 1j * p.carrier_im, ref["carrier"], atol=1e-6)


def test_floor_reads_noise_bins_as_phase_zero_and_keeps_the_others():
  spec = _spectrum_with_small_bins(0, (2, 6, 4, 3), 1e-4)
  p = spectral.guarded_polar(spec.real, spec.imag, 6, "floor", 1e-4)
  small = np.abs(spec) < 1e-5
  assert small.any() and (~small).any()
  np.testing.assert_array_equal(p.valid, ~small)
  np.testing.assert_array_equal(np.asarray(p.phasor_re)[small], 1.0)
  np.testing.assert_array_equal(np.asarray(p.phasor_im)[small], 0.0)
  exact = spectral.guarded_polar(spec.real, spec.imag, 6, "exact")
  # Op by op on purpose: bitwise equal only so. Compiled, XLA may contract the exact guard's re*re + im*im into an
  # FMA (one rounding less) and the floor guard's not, so 1-ulp differences of |X| appear (measured: 7 of 115).
  for a, b in zip(p, exact):
    np.testing.assert_array_equal(np.asarray(a)[~small], np.asarray(b)[~small])


def test_conjugate_pairs_are_exact_conjugates_and_self_conjugate_bins_real():
  height, width = 6, 8
  rng = np.random.default_rng(3)
  # A real map's spectrum, then independent rounding-size noise on every bin (as a float32 FFT leaves it).
  spec = _np_rfft2(rng.normal(size=(2, height, width, 3)))
  spec = spec * (1 + 1e-7 * rng.normal(size=spec.shape)) + 1e-7j * rng.normal(size=spec.shape)
  spec = spec.astype(np.complex64)
  p = jax.jit(lambda re, im: spectral.guarded_polar(re, im, width, "exact", conjugate_pairs=True))(spec.real, spec.imag)
  pairs = np.array([u for u in range(1, height) if 2 * u != height])
  mirror = (-pairs) % height
  for k in (0, width // 2):
    np.testing.assert_array_equal(np.asarray(p.phase)[:, mirror, k], -np.asarray(p.phase)[:, pairs, k])
    np.testing.assert_array_equal(np.asarray(p.carrier_im)[:, mirror, k], -np.asarray(p.carrier_im)[:, pairs, k])
    np.testing.assert_array_equal(np.asarray(p.amplitude)[:, mirror, k], np.asarray(p.amplitude)[:, pairs, k])
    for u in (0, height // 2):  # real bins: phase 0 or pi by the sign of the real part, no imaginary part
      np.testing.assert_array_equal(np.asarray(p.carrier_im)[:, u, k], 0.0)
      np.testing.assert_array_equal(np.asarray(p.phase)[:, u, k],
                                    np.where(np.asarray(p.carrier_re)[:, u, k] < 0, np.float32(np.pi), 0.0))


def test_near_cut_fraction_counts_by_hand():
  # One sample, one channel, H = 4, W = 4 (K = 3): 12 bins; self-conjugate (0,0), (2,0), (0,2), (2,2).
  phase = np.zeros((1, 4, 3, 1), np.float32)
  valid = np.ones((1, 4, 3, 1), bool)
  phase[0, 1, 1, 0] = np.pi - 5e-4   # near the cut
  phase[0, 3, 1, 0] = -np.pi + 2e-4  # near the cut
  phase[0, 1, 0, 0] = np.pi - 2e-3   # not within 1e-3
  phase[0, 0, 0, 0] = np.pi          # self-conjugate: not counted
  phase[0, 2, 1, 0] = np.pi          # near, but floored
  valid[0, 2, 1, 0] = False
  zeros = np.zeros_like(phase)
  p = spectral.Polar(zeros, phase, zeros, zeros, zeros, zeros, valid)
  # counted: 12 - 4 self-conjugate - 1 floored = 7; near: 2. Both counts are exact float32 sums of ones, so the
  # fraction is one IEEE division: exactly float32(2) / float32(7).
  np.testing.assert_array_equal(jax.jit(spectral.near_cut_fraction, static_argnums=(1, 2))(p, 4, 1e-3),
                                np.float32(2) / np.float32(7))


def test_unknown_guard_is_named():
  with pytest.raises(ValueError, match="phase_guard='noisy'"):
    spectral.check_phase_guard("noisy", 1e-4, 1e-4)
  with pytest.raises(ValueError, match="phase_floor=1.5"):
    spectral.check_phase_guard("floor", 1.5, 1e-4)


@pytest.mark.parametrize("height,width", [(6, 4), (7, 5), (4, 9)])  # even and odd sizes (Nyquist bins)
def test_dft_matmul_transforms_match_numpy_fft(height, width):
  rng = np.random.default_rng(height * width)
  x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
  re, im = jax.jit(spectral.dft_rfft2)(x)
  reference = _np_rfft2(x)
  # Worst-case float32 error, per map and channel: W-term dot products of the rows with float32 entries <= 1/sqrt(W)
  # (gamma_(W+1)), then 2H-term ones with (cos, sin) pairs / sqrt(H) (|cos| + |sin| <= sqrt(2), gamma_(2H+1)):
  # sqrt(2) (W + 2H + 2) u sum|x| / sqrt(HW), up to 1e-5 here.
  bound = np.sqrt(2) * (width + 2 * height + 2) * U * np.abs(x).sum(axis=(1, 2), keepdims=True)
  bound = np.broadcast_to(bound / np.sqrt(height * width), re.shape)
  np.testing.assert_array_less(np.abs(re - reference.real), bound)
  np.testing.assert_array_less(np.abs(im - reference.imag), bound)
  # Any half spectrum, not only a Hermitian one: irfft2 drops the imaginary parts numpy drops.
  half = (rng.normal(size=reference.shape) + 1j * rng.normal(size=reference.shape)).astype(np.complex64)
  y = jax.jit(spectral.dft_irfft2, static_argnums=(2, 3))(half.real, half.imag, height, width)
  # The inverse likewise: 2H-term products (entries <= 1/sqrt(H)), then 2K-term ones with (cos, sin) pairs times
  # c_k <= 2 over sqrt(W): 2 sqrt(2) (2H + 2K + 2) u sum(|re| + |im|) / sqrt(HW), up to 2.2e-5 here.
  k_count = width // 2 + 1
  bound = 2 * np.sqrt(2) * (2 * height + 2 * k_count + 2) * U / np.sqrt(height * width)
  bound = np.broadcast_to(bound * (np.abs(half.real) + np.abs(half.imag)).sum(axis=(1, 2), keepdims=True), y.shape)
  np.testing.assert_array_less(np.abs(y - _np_irfft2(half, height, width)), bound)


def test_dft_matmul_inverse_gradient_is_the_transpose_of_numpy_irfft2():
  height, width, k = 4, 6, 4  # even width: DC and Nyquist columns
  weights = np.random.default_rng(5).normal(size=(1, height, width, 1))
  loss = lambda re, im: jnp.sum(jnp.asarray(weights, jnp.float32) * spectral.dft_irfft2(re, im, height, width))
  zeros = np.zeros((1, height, k, 1), np.float32)
  grad_re, grad_im = map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1)))(zeros, zeros))
  # The inverse is linear: d loss / d re[u, v] = sum(weights * irfft2(unit spectrum at (u, v))), and i for im.
  expected_re = np.zeros((height, k))
  expected_im = np.zeros((height, k))
  for u in range(height):
    for v in range(k):
      unit = np.zeros((1, height, k, 1), np.complex128)
      unit[0, u, v, 0] = 1.0
      expected_re[u, v] = np.sum(weights * _np_irfft2(unit, height, width))
      expected_im[u, v] = np.sum(weights * _np_irfft2(1j * unit, height, width))
  # The VJP is the transposed products applied to the float32-rounded weights: W-term dot products with entries
  # <= 2 / sqrt(W), then 2H-term ones with (cos, sin) pairs / sqrt(H): worst case
  # 2 sqrt(2) (W + 2H + 3) u sum|weights| / sqrt(HW) = 1.06e-5.
  bound = 2 * np.sqrt(2) * (width + 2 * height + 3) * U * np.abs(weights).sum() / np.sqrt(height * width)
  np.testing.assert_allclose(grad_re[0, :, :, 0], expected_re, rtol=0, atol=bound)
  np.testing.assert_allclose(grad_im[0, :, :, 0], expected_im, rtol=0, atol=bound)


def test_unknown_spectral_transform_is_named():
  with pytest.raises(ValueError, match="spectral_transform='dct'"):
    spectral.rfft2(np.zeros((1, 4, 4, 1), np.float32), "dct")


def test_polar_at_zero():
  amp, phase, cos, sin = jax.jit(spectral.polar)(np.zeros((3,), np.float32), np.zeros((3,), np.float32))
  np.testing.assert_array_equal(amp, 0.0)
  np.testing.assert_array_equal(phase, 0.0)
  np.testing.assert_array_equal(cos, 1.0)
  np.testing.assert_array_equal(sin, 0.0)


def test_principal_angle_reads_the_negative_real_axis_as_plus_pi_with_arctan2s_gradient():
  re = np.float32([-1.0, -1.0, -1.0, -2.0, -1.0, 1.0, 0.5])
  im = np.float32([-0.0, 0.0, -1e-9, 1e-9, -1e-3, -0.0, 0.5])
  angle = np.asarray(jax.jit(spectral.principal_angle)(re, im))
  # On the negative real axis (a zero of either sign, or noise below float32's 2.4e-7 rad step at pi) the
  # principal value +pi, where arctan2 gives -pi for the negative ones; off the axis arctan2's value.
  expected = np.float32([np.pi, np.pi, np.pi, np.pi, np.arctan2(-1e-3, -1.0), 0.0, np.pi / 4])
  np.testing.assert_array_equal(angle[:4], expected[:4])
  np.testing.assert_allclose(angle[4:], expected[4:], rtol=2e-7)  # float32 arctan2: within ~1 ulp (1.2e-7)
  # d angle / d (re, im) = (-im, re) / (re^2 + im^2) (hand formula), also at the bins read as +pi; a few float32
  # operations from the inputs, so 1e-6 relative (atol for the exact zeros of the first column).
  grad_re, grad_im = jax.jit(jax.grad(lambda r, i: jnp.sum(spectral.principal_angle(r, i)), argnums=(0, 1)))(re, im)
  r64, i64 = re.astype(np.float64), im.astype(np.float64)
  np.testing.assert_allclose(grad_re, -i64 / (r64 ** 2 + i64 ** 2), rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(grad_im, r64 / (r64 ** 2 + i64 ** 2), rtol=1e-6)


@pytest.mark.parametrize("guard", ["exact", "reference"])
def test_guarded_polar_phase_cut_reads_the_negative_real_axis_by_the_zeros_sign_or_as_plus_pi(guard):
  # Bins [B=1, H=1, K=4, C=1]: on the negative real axis with imaginary part -0.0, +0.0, -1e-9 (below float32's
  # 2.4e-7 rad step at pi); and -1 - 1e-3 i, off the axis. The "reference" guard's 1e-7 shift leaves them there.
  re = np.float32([-1.0, -1.0, -2.0, -1.0]).reshape(1, 1, 4, 1)
  im = np.float32([-0.0, 0.0, -1e-9, -1e-3]).reshape(1, 1, 4, 1)
  off_axis = np.arctan2(-1e-3, -1.0 + (1e-7 if guard == "reference" else 0.0))
  expected = {"arctan2": [-np.pi, np.pi, -np.pi, off_axis], "principal": [np.pi, np.pi, np.pi, off_axis]}
  for cut, want in expected.items():
    phase = jax.jit(lambda r, i, c=cut: spectral.guarded_polar(r, i, 6, guard, cut=c).phase)(re, im)
    np.testing.assert_allclose(np.asarray(phase).ravel(), np.float32(want), rtol=2e-7)  # ~1 float32 ulp
  with pytest.raises(ValueError, match="phase_cut='flip'"):
    spectral.guarded_polar(re, im, 6, guard, cut="flip")
