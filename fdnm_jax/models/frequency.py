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

Bins that are rounding noise: ANM gives every bin the O(1) amplitude of its normalised amplitude mix whatever
|X| was, with the phase of X, and AGP's P (1 + s) jumps across the negative real axis. Where |X| is float
rounding noise above the 1e-15 guard (a map constant along an axis has such bins), that phase is noise, so the
outputs depend on how the transform was computed: `jnp.fft` vs the DFT products of `spectral_transform=
"dft_matmul"`, and equally CPU vs GPU or JAX vs PyTorch. On random maps the two transforms give the same FDNM
outputs to 1e-5; on the synthetic images of tests/configs/tiny.py the first step's L_cnm was 9.11 (fft) vs 9.38
(dft_matmul) and the orthogonality term -2.36 vs -1.89, with ID and triplet losses within 1 %.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdnm_jax.errors import ConfigError
from fdnm_jax.models import linear

Dtype = Any

# How the 2-D real FFTs are computed (AGP, ANM; config.model.spectral_transform).
SPECTRAL_TRANSFORMS = ("fft", "dft_matmul")

# |X|^2 below this counts as zero for the phase (|X| < 1e-15; features are O(1)).
_ZERO_POWER = 1e-30

# PyTorch's default Conv2d/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_spectral_transform(transform: str) -> None:
  """Raises ValueError naming `model.spectral_transform` unless `transform` is one of SPECTRAL_TRANSFORMS."""
  if transform not in SPECTRAL_TRANSFORMS:
    raise ConfigError(f"model.spectral_transform={transform!r}: expected one of {SPECTRAL_TRANSFORMS}.")


def rfft2(x: jax.Array, transform: str = "fft") -> tuple[jax.Array, jax.Array]:
  """Orthonormal 2-D real FFT over H, W of a [B, H, W, C] map, in float32.

  Args:
    x: [B, H, W, C], any float dtype (cast to float32).
    transform: "fft" (`jnp.fft.rfft2`) or "dft_matmul" (`dft_rfft2`).

  Returns:
    (real, imag) parts of the spectrum, float32 [B, H, W//2+1, C] each.
  """
  check_spectral_transform(transform)
  x = x.astype(jnp.float32)
  if transform == "dft_matmul":
    return dft_rfft2(x)
  spectrum = jnp.fft.rfft2(x, axes=(1, 2), norm="ortho")
  return jnp.real(spectrum), jnp.imag(spectrum)


def irfft2(real: jax.Array, imag: jax.Array, height: int, width: int, transform: str = "fft") -> jax.Array:
  """Inverse of `rfft2`: (real, imag) float32 [B, H, W//2+1, C] -> float32 [B, height, width, C]."""
  check_spectral_transform(transform)
  if transform == "dft_matmul":
    return dft_irfft2(real, imag, height, width)
  return jnp.fft.irfft2(jax.lax.complex(real, imag), s=(height, width), axes=(1, 2), norm="ortho")


@functools.lru_cache(maxsize=None)
def _dft_matrices(height: int, width: int) -> dict[str, np.ndarray]:
  """The four real matrices of `dft_rfft2` / `dft_irfft2` for an H x W map (float64 maths, float32 out).

  K = W // 2 + 1 frequency columns. Index orders (row-major, matching the reshapes in the callers):
    w_forward [(p, k), w]   [2K, W]:  p = 0: cos(2 pi k w / W) / sqrt(W); p = 1: -sin(...) / sqrt(W).
    h_forward [(q, u), (h, p)] [2H, 2H]: complex DFT over H (e^{-2 pi i u h / H} / sqrt(H)) acting on
      (real, imag) pairs; q = 0 real part out, q = 1 imaginary part out.
    h_inverse [(h, q), (p, u)] [2H, 2H]: complex inverse DFT over H (e^{+2 pi i u h / H} / sqrt(H)).
    w_inverse [w, (q, k)]   [W, 2K]: the real inverse over W: c_k (re cos - im sin) / sqrt(W), c_k = 1 for
      k = 0 and (W even) k = W/2, else 2 (the Hermitian half counted twice), as numpy's irfft (which ignores
      the imaginary parts of those two bins: sin vanishes there).
  """
  k_count = width // 2 + 1
  k = np.arange(k_count)[:, None]
  w = np.arange(width)[None, :]
  angle_w = 2.0 * np.pi * k * w / width  # [K, W]
  w_forward = np.concatenate([np.cos(angle_w), -np.sin(angle_w)], axis=0) / np.sqrt(width)
  weight = np.full((k_count, 1), 2.0)
  weight[0] = 1.0
  if width % 2 == 0:
    weight[-1] = 1.0
  w_inverse = np.concatenate([weight * np.cos(angle_w), -weight * np.sin(angle_w)], axis=0).T / np.sqrt(width)

  u = np.arange(height)[:, None]
  h = np.arange(height)[None, :]
  cos_h = np.cos(2.0 * np.pi * u * h / height) / np.sqrt(height)  # [u, h], symmetric
  sin_h = np.sin(2.0 * np.pi * u * h / height) / np.sqrt(height)
  # Forward: re' = cos re + sin im, im' = cos im - sin re; rows (q, u), columns (h, p).
  h_forward = np.zeros((2, height, height, 2))
  h_forward[0, :, :, 0], h_forward[0, :, :, 1] = cos_h, sin_h
  h_forward[1, :, :, 0], h_forward[1, :, :, 1] = -sin_h, cos_h
  # Inverse: re = cos re' - sin im', im = sin re' + cos im'; rows (h, q), columns (p, u).
  h_inverse = np.zeros((height, 2, 2, height))
  h_inverse[:, 0, 0, :], h_inverse[:, 0, 1, :] = cos_h.T, -sin_h.T
  h_inverse[:, 1, 0, :], h_inverse[:, 1, 1, :] = sin_h.T, cos_h.T
  return {"w_forward": w_forward.astype(np.float32),
          "h_forward": h_forward.reshape(2 * height, 2 * height).astype(np.float32),
          "h_inverse": h_inverse.reshape(2 * height, 2 * height).astype(np.float32),
          "w_inverse": w_inverse.astype(np.float32)}


def _batched_matmul(matrix: np.ndarray, x: jax.Array) -> jax.Array:
  """matrix [M, N] @ x[n] [N, F] for every n of x [n, N, F] -> [n, M, F], as a batched dot_general.

  The constant is broadcast over the batch so the result comes out in x's own layout (a plain
  `dot_general` with a shared matrix puts its free axis first and XLA adds a transpose).
  """
  batch = x.shape[0]
  lhs = jnp.broadcast_to(jnp.asarray(matrix), (batch,) + matrix.shape)
  return jax.lax.dot_general(lhs, x, (((2,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)


def dft_rfft2(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`rfft2` as two real matrix products (the DFT over W, then the complex DFT over H), float32.

  Same result as `jnp.fft.rfft2(x, axes=(1, 2), norm="ortho")` to float32 rounding. On the 2-core CPU the
  matrix products (about 2 H + W multiply-adds per output value) run faster than XLA's FFT with the layout
  transposes it needs around the minor-most axes (docs/benchmarks.md).
  """
  batch, height, width, channels = x.shape
  m = _dft_matrices(height, width)
  k_count = width // 2 + 1
  rows = _batched_matmul(m["w_forward"], x.reshape(batch * height, width, channels))  # [B*H, 2K, C]
  cols = _batched_matmul(m["h_forward"], rows.reshape(batch, 2 * height, k_count * channels))  # [B, 2H, K*C]
  spectrum = cols.reshape(batch, 2, height, k_count, channels)
  return spectrum[:, 0], spectrum[:, 1]


def dft_irfft2(real: jax.Array, imag: jax.Array, height: int, width: int) -> jax.Array:
  """`irfft2` as two real matrix products (the inverse complex DFT over H, then the real inverse over W)."""
  batch, _, k_count, channels = real.shape
  m = _dft_matrices(height, width)
  stacked = jnp.stack([real, imag], axis=1).reshape(batch, 2 * height, k_count * channels)  # (p, u)
  cols = _batched_matmul(m["h_inverse"], stacked)  # [B, (h, q), K*C]
  rows = _batched_matmul(m["w_inverse"], cols.reshape(batch * height, 2 * k_count, channels))  # [B*H, W, C]
  return rows.reshape(batch, height, width, channels)


def polar(re: jax.Array, im: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Guarded polar decomposition of a spectrum X = re + i im (float32 arrays of one shape).

  Returns:
    (amplitude, phase, cos_phase, sin_phase), float32, the shape of `re`:
    amplitude = |X|, phase = angle(X) in (-pi, pi], (cos, sin) = X / |X|; at
    |X| = 0 they are 0, 0, (1, 0) with zero gradients.
  """
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
    transform: how the 2-D FFTs are computed, one of SPECTRAL_TRANSFORMS (`rfft2`).
  """

  groups: int = 4
  transform: str = "fft"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies AGP to x [B, H, W, C] (any float dtype); returns [B, H, W, C] in x.dtype."""
    _, height, width, channels = x.shape
    if channels % self.groups:
      raise ConfigError(f"AGP: {channels} channels are not divisible by agp_groups={self.groups}.")
    re, im = rfft2(x, self.transform)
    amplitude, phase, _, _ = polar(re, im)
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
    cos_turn, sin_turn = jnp.cos(turn), jnp.sin(turn)
    rotated_re = re * cos_turn - im * sin_turn
    rotated_im = re * sin_turn + im * cos_turn
    return irfft2(rotated_re, rotated_im, height, width, self.transform).astype(x.dtype)


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
    transform: how the 2-D FFTs are computed, one of SPECTRAL_TRANSFORMS (`rfft2`).
  """

  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  transform: str = "fft"

  @nn.compact
  def __call__(self, f: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns the two nuance maps (f_1, f_2), each [B, H, W, C] in `dtype`."""
    _, height, width, channels = f.shape
    amplitude, _, cos_phase, sin_phase = polar(*rfft2(f, self.transform))
    bn = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                      dtype=self.dtype, param_dtype=jnp.float32, name="bn")
    outputs = []
    for i in (1, 2):
      mixed = linear.ChannelDense(channels, kernel_init=torch_default_kernel_init,
                                  precision=jax.lax.Precision.HIGHEST, name=f"conv{i}")(amplitude)
      mixed = nn.InstanceNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                              use_fast_variance=False, name=f"inorm{i}")(mixed)
      outputs.append(bn(irfft2(mixed * cos_phase, mixed * sin_phase, height, width, self.transform)))
    return outputs[0], outputs[1]
