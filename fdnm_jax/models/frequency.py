"""FDNM's frequency-domain modules, AGP and ANM (FDNM_SPEC §1.2, §1.3), on NHWC maps.

Both transform the spatial axes H, W of a map x [B, H, W, C] with
`X = rfft2(x, axes=(1, 2), norm="ortho")` and come back with
`irfft2(., s=(H, W), axes=(1, 2), norm="ortho")`. Every FFT-domain operation runs
in float32 whatever the compute dtype (the map is cast to float32 on the way in
and back to its own dtype on the way out): complex bfloat16 is not supported.

Amplitude and phase at |X| = 0: `|X|`, `angle(X)` and `X / |X|` have no gradient
there (0/0). They are computed with the double-`where` trick: where |X|^2 <= 1e-30
the amplitude is 0, the phase 0 and the unit phasor 1 (torch.angle(0) = 0), each
with a zero gradient, so an all-zero map gives finite gradients.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# |X|^2 below this counts as zero for the phase (|X| < 1e-15; features are O(1)).
_ZERO_POWER = 1e-30

# PyTorch's default Conv2d/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def rfft2(x: jax.Array) -> jax.Array:
  """Orthonormal 2-D real FFT over H, W of a [B, H, W, C] map, in float32 -> complex64 [B, H, W//2+1, C]."""
  return jnp.fft.rfft2(x.astype(jnp.float32), axes=(1, 2), norm="ortho")


def irfft2(spectrum: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `rfft2`: complex [B, H, W//2+1, C] -> float32 [B, height, width, C]."""
  return jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2), norm="ortho")


def polar(spectrum: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Guarded polar decomposition of a complex64 spectrum.

  Returns:
    (amplitude, phase, cos_phase, sin_phase), float32, same shape as `spectrum`:
    amplitude = |X|, phase = angle(X) in (-pi, pi], (cos, sin) = X / |X|; at
    |X| = 0 they are 0, 0, (1, 0) with zero gradients.
  """
  re = jnp.real(spectrum)
  im = jnp.imag(spectrum)
  power = re * re + im * im
  nonzero = power > _ZERO_POWER
  safe_power = jnp.where(nonzero, power, 1.0)
  safe_amp = jnp.sqrt(safe_power)
  amplitude = jnp.where(nonzero, safe_amp, 0.0)
  safe_re = jnp.where(nonzero, re, 1.0)
  safe_im = jnp.where(nonzero, im, 0.0)
  phase = jnp.where(nonzero, jnp.arctan2(safe_im, safe_re), 0.0)
  cos_phase = jnp.where(nonzero, safe_re / safe_amp, 1.0)
  sin_phase = jnp.where(nonzero, safe_im / safe_amp, 0.0)
  return amplitude, phase, cos_phase, sin_phase


class AGP(nn.Module):
  """Amplitude Guided Phase (FDNM_SPEC §1.2): a channel gate from the amplitude rescales the phase.

  For x [B, H, W, C]: X = rfft2(x), A = |X|, P = angle(X), a = mean of A over the
  frequency grid [B, C], s = sigmoid(W a), P' = P * s + P, y = irfft2(A exp(i P')),
  computed as irfft2(X exp(i P s)): equal, as A exp(i P) = X (only at the guarded
  bins with 0 < |X|^2 <= 1e-30 it keeps X, below 1e-15, where the formula gives 0).
  No residual or norm. Same shape and dtype as x.

  W is a bias-free C -> C linear map written as `groups` parallel maps
  `gate_0 .. gate_{groups-1}`, each seeing the full C-vector a and producing
  C / groups outputs, concatenated in order: a C x C matrix split column-wise
  into groups, C*C weights in total (the reference's `groups` 1x1 convs
  C -> C/groups). Each kernel is [C, C/groups]. Kernels use PyTorch's default
  conv init U(+-1/sqrt(C)) (the spec is silent).

  Note the formula's own discontinuity: angle(X) jumps from pi to -pi across the
  negative real axis, and P * (1 + s) turns that jump into a jump of y for
  spectrum bins that sit on it (e.g. a negative DC or Nyquist bin).

  Attributes:
    groups: number of parallel C -> C/groups gate maps (C must be divisible).
  """

  groups: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies AGP to x [B, H, W, C] (any float dtype); returns [B, H, W, C] in x.dtype."""
    _, height, width, channels = x.shape
    if channels % self.groups:
      raise ValueError(f"AGP: {channels} channels are not divisible by agp_groups={self.groups}.")
    spectrum = rfft2(x)
    amplitude, phase, _, _ = polar(spectrum)
    mean_amplitude = jnp.mean(amplitude, axis=(1, 2))
    logits = jnp.concatenate(
        [
            nn.Dense(channels // self.groups, use_bias=False, dtype=jnp.float32,
                     param_dtype=jnp.float32, kernel_init=torch_default_kernel_init,
                     precision=jax.lax.Precision.HIGHEST, name=f"gate_{g}")(mean_amplitude)
            for g in range(self.groups)
        ],
        axis=-1,
    )
    turn = phase * nn.sigmoid(logits)[:, None, None, :]
    # A exp(i (P s + P)) = X exp(i P s): the amplitude only feeds the gate.
    rotated = spectrum * jax.lax.complex(jnp.cos(turn), jnp.sin(turn))
    return irfft2(rotated, height, width).astype(x.dtype)


class ANM(nn.Module):
  """Amplitude Nuances Mining (FDNM_SPEC §1.3): two amplitude-remixed views of one map.

  For f [B, H, W, C]: X = rfft2(f), A = |X|, P = angle(X); for i = 1, 2:
  A_i = InstanceNorm_i(Conv1x1_i(A)), f_i = BN(irfft2(A_i exp(i P))), with one BN
  shared by both branches (called once per branch: per-branch batch statistics,
  running averages updated twice per step, as PyTorch does calling it twice).
  exp(i P) is computed as the unit phasor X / |X| (no angle needed).

  Submodules: `conv1`, `conv2` (bias-free C -> C 1x1 convs on the amplitude,
  written as Dense layers with kernel [C_in, C_out], i.e. a PyTorch weight
  w[:, :, 0, 0].T; PyTorch default init), `inorm1`, `inorm2` (affine instance norm over the
  frequency grid per sample and channel, eps 1e-5, biased variance), `bn`
  (BatchNorm2d, eps 1e-5).

  Attributes:
    dtype: dtype of the BN and of the outputs; the FFT math is float32.
    bn_momentum: running-average decay of `bn` (Flax convention).
  """

  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, f: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns the two nuance maps (f_1, f_2), each [B, H, W, C] in `dtype`."""
    _, height, width, channels = f.shape
    amplitude, _, cos_phase, sin_phase = polar(rfft2(f))
    bn = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                      dtype=self.dtype, param_dtype=jnp.float32, name="bn")
    outputs = []
    for i in (1, 2):
      mixed = nn.Dense(channels, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                       kernel_init=torch_default_kernel_init,
                       precision=jax.lax.Precision.HIGHEST, name=f"conv{i}")(amplitude)
      mixed = nn.InstanceNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                              use_fast_variance=False, name=f"inorm{i}")(mixed)
      spectrum = jax.lax.complex(mixed * cos_phase, mixed * sin_phase)
      outputs.append(bn(irfft2(spectrum, height, width)))
    return outputs[0], outputs[1]
