"""The 2-D real spectrum of a map and its guarded polar form, for AGP and ANM (fdnm_jax/models/frequency.py).

Two jobs, both below the paper's formulas:
  - How the spectrum is computed: `rfft2` / `irfft2` over H, W of an NHWC map, orthonormal, in float32, either
    with `jnp.fft` or as real DFT matrix products ("dft_matmul", a CPU speed option with the same maths).
  - How a spectrum X is read as amplitude and phase (`guarded_polar`): where |X| is float rounding noise (a map
    constant along an axis has such bins), angle(X) is noise too and ANM hands it an O(1) amplitude, so its
    outputs would depend on how the transform rounded (jnp.fft vs dft_matmul, CPU type, device count). The
    `PHASE_GUARDS` choose what a noise bin's phase becomes; `conjugate_pairs` makes the two halves of the
    self-conjugate columns (k = 0 and, for even W, k = W/2) one phase, so the inverse transform sees a
    Hermitian half spectrum whatever rounding did.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdnm_jax.errors import ConfigError

# How the 2-D real FFTs are computed (AGP, ANM; config.model.spectral_transform).
SPECTRAL_TRANSFORMS = ("fft", "dft_matmul")

# How a bin's phase is read (AGP, ANM; config.model.phase_guard); see `guarded_polar`.
PHASE_GUARDS = ("exact", "reference", "floor", "soft")

# How AGP reads a bin on the negative real axis (config.model.phase_cut); see `principal_angle`.
PHASE_CUTS = ("principal", "arctan2")

# |X|^2 below this counts as zero for the phase (|X| < 1e-15; features are O(1)).
ZERO_POWER = 1e-30

# "reference" guard: the public PyTorch code's angle(X + 1e-7) (the shift is real).
REFERENCE_PHASE_SHIFT = 1e-7


def check_spectral_transform(transform: str) -> None:
  """Raises ConfigError naming `model.spectral_transform` unless `transform` is one of SPECTRAL_TRANSFORMS."""
  if transform not in SPECTRAL_TRANSFORMS:
    raise ConfigError(f"model.spectral_transform={transform!r}: expected one of {SPECTRAL_TRANSFORMS}.")


def check_phase_guard(guard: str, floor: float, soft_eps: float) -> None:
  """Raises ConfigError naming the `model.phase_*` field that is not a valid guard setting."""
  if guard not in PHASE_GUARDS:
    raise ConfigError(f"model.phase_guard={guard!r}: expected one of {PHASE_GUARDS}.")
  if not 0.0 <= floor < 1.0:
    raise ConfigError(f"model.phase_floor={floor}: expected a fraction of the RMS amplitude in [0, 1).")
  if not soft_eps >= 0.0:
    raise ConfigError(f"model.phase_soft_eps={soft_eps}: expected >= 0 (a fraction of the RMS amplitude).")


def check_phase_cut(cut: str) -> None:
  """Raises ConfigError naming `model.phase_cut` unless `cut` is one of PHASE_CUTS."""
  if cut not in PHASE_CUTS:
    raise ConfigError(f"model.phase_cut={cut!r}: expected one of {PHASE_CUTS}.")


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


def principal_angle(re: jax.Array, im: jax.Array) -> jax.Array:
  """angle(re + i im) in (-pi, pi] (float32 radians; the shape of re): arctan2 with -pi read as +pi.

  arctan2 returns -pi for a bin on the negative real axis whose imaginary part is -0.0 or a negative amount below
  float32's resolution of the angle (|im| < ~1e-7 |re|): the sign of a zero or of rounding noise, which depends on
  how the transform rounded (jnp.fft, dft_matmul, the CPU type, cuFFT). AGP turns P by P s, so -pi and +pi give
  different outputs; reading them as +pi, the principal value, makes such bins well-posed (config
  model.phase_cut="principal"; "arctan2" keeps arctan2's -pi, the reference reading). The gradient is arctan2's
  (the shift by 2 pi is a constant). Noise above that step still picks a side of the cut (AGP's own
  discontinuity, `near_cut_fraction`).
  """
  angle = jnp.arctan2(im, re)
  return jnp.where(angle <= -np.float32(np.pi), angle + np.float32(2.0 * np.pi), angle)


def polar(re: jax.Array, im: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Guarded polar decomposition of a spectrum X = re + i im (float32 arrays of one shape).

  Returns:
    (amplitude, phase, cos_phase, sin_phase), float32, the shape of `re`:
    amplitude = |X|, phase = angle(X) in (-pi, pi], (cos, sin) = X / |X|; at
    |X|^2 <= ZERO_POWER they are 0, 0, (1, 0) with zero gradients (the double-`where`
    trick: |X|, angle(X) and X / |X| have no gradient at 0).
  """
  power = re * re + im * im
  nonzero = power > ZERO_POWER
  safe_power = jnp.where(nonzero, power, 1.0)
  safe_amp = jnp.sqrt(safe_power)
  amplitude = jnp.where(nonzero, safe_amp, 0.0)
  safe_re = jnp.where(nonzero, re, 1.0)
  safe_im = jnp.where(nonzero, im, 0.0)
  phase = jnp.where(nonzero, principal_angle(safe_re, safe_im), 0.0)
  cos_phase = jnp.where(nonzero, safe_re / safe_amp, 1.0)
  sin_phase = jnp.where(nonzero, safe_im / safe_amp, 0.0)
  return amplitude, phase, cos_phase, sin_phase


class Polar(NamedTuple):
  """A spectrum read by `guarded_polar`; float32 arrays [B, H, K, C] (K = W//2 + 1), `valid` bool.

  amplitude: |X| (0 at floored bins).
  phase: the phase P in (-pi, pi] that AGP turns (0 at floored bins).
  phasor_re, phasor_im: the factor that stands for exp(i P) in A exp(i P) (ANM's carrier of the phase):
    unit for "exact", "reference", "floor"; X / sqrt(|X|^2 + eps^2) for "soft".
  carrier_re, carrier_im: amplitude * phasor, the bin AGP rotates by P s (X itself for "exact").
  valid: the bins that carry a phase (not floored, |X|^2 > ZERO_POWER).
  """

  amplitude: jax.Array
  phase: jax.Array
  phasor_re: jax.Array
  phasor_im: jax.Array
  carrier_re: jax.Array
  carrier_im: jax.Array
  valid: jax.Array


def self_conjugate_columns(width: int) -> tuple[int, ...]:
  """The rfft columns k whose bins (u, k) and (-u mod H, k) are conjugates for real maps: 0 and, for even W, W/2."""
  return (0, width // 2) if width % 2 == 0 and width > 1 else (0,)


def _mirror_rows(a: jax.Array) -> jax.Array:
  """a[:, (-u) mod H] for every row u of a [B, H, ...]."""
  return jnp.roll(jnp.flip(a, axis=1), 1, axis=1)


def _self_conjugate_mask(height: int, width: int, rows: str) -> np.ndarray:
  """bool [1, H, K, 1]: the bins of the self-conjugate columns, all rows ("all") or the mirrored rows -u of the
  pairs, u > H/2 ("mirrored")."""
  k_count = width // 2 + 1
  row_mask = np.ones(height, bool) if rows == "all" else np.arange(height) > height / 2
  col_mask = np.zeros(k_count, bool)
  col_mask[list(self_conjugate_columns(width))] = True
  return (row_mask[:, None] & col_mask[None, :])[None, :, :, None]


def _hermitian_columns(re: jax.Array, im: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Projects the self-conjugate columns of a half spectrum [B, H, K, C] onto their Hermitian part.

  X'(u, k) = (X(u, k) + conj X(-u, k)) / 2 for k in `self_conjugate_columns(width)`: the part of the column
  that numpy's irfft2 (and `dft_irfft2`) reads; the rest is rounding noise for a real map's spectrum. Pairs
  become exact conjugates (bitwise: the sums commute) and the self-conjugate bins (u = 0, and u = H/2 for
  even H) exactly real with imaginary part +0. (Whole-array `where`s with a static mask: one select per part
  instead of a scatter per column.)
  """
  mask = jnp.asarray(_self_conjugate_mask(re.shape[1], width, "all"))
  re = jnp.where(mask, 0.5 * (re + _mirror_rows(re)), re)
  im = jnp.where(mask, 0.5 * (im - _mirror_rows(im)), im)
  return re, im


def _mirror_phases(p: Polar, width: int) -> Polar:
  """In the self-conjugate columns, copies rows u < H/2 onto rows -u (phase, phasor and carrier negated
  in their imaginary part), so each conjugate pair has one phase: rows 1 .. ceil(H/2) - 1 are the masters."""
  mirror = jnp.asarray(_self_conjugate_mask(p.amplitude.shape[1], width, "mirrored"))
  fields = {}
  for name, value in p._asdict().items():
    mirrored = _mirror_rows(value)
    if name in ("phase", "phasor_im", "carrier_im"):
      mirrored = -mirrored
    fields[name] = jnp.where(mirror, mirrored, value)
  return Polar(**fields)


def guarded_polar(re: jax.Array, im: jax.Array, width: int, guard: str = "exact", floor: float = 1e-4,
                  soft_eps: float = 1e-4, conjugate_pairs: bool = False, cut: str = "arctan2") -> Polar:
  """Reads a half spectrum X = re + i im [B, H, K, C] (float32, K = width//2 + 1) as amplitude and phase.

  Guards (`PHASE_GUARDS`, config model.phase_guard), each with the double-`where` zero guard of `polar`:
    "exact": angle(X), X / |X| (the spec; |X|^2 <= ZERO_POWER reads as 0 with phase 0).
    "reference": P = angle(X + 1e-7) as the public PyTorch code (real shift), phasor exp(i P), carrier
      |X| exp(i P).
    "floor": a bin whose |X| < floor * RMS amplitude of its channel (sqrt of the mean of |X|^2 over this
      [H, K] grid, per sample) reads as amplitude 0, phase 0, phasor 1: its phase is no longer rounding noise,
      while a bin above the floor reads exactly as "exact". The threshold carries no gradient.
    "soft": phasor X / sqrt(|X|^2 + eps^2) with eps = soft_eps * the channel's RMS amplitude (relative, as the
      floor, so the guard does not depend on the feature scale); amplitude |X| and P = angle(X) as "exact",
      carrier |X| * phasor. Gradients flow through eps.
  conjugate_pairs: first projects the self-conjugate columns onto their Hermitian part (`_hermitian_columns`),
    then gives each conjugate pair of those columns one reading (rows u < H/2 mirrored onto -u, phase negated);
    a self-conjugate bin is then real, phase 0 (re >= 0) or pi (re < 0).
  cut: the phase of a bin on the negative real axis, one of PHASE_CUTS: "principal" (`principal_angle`: +pi
    whatever the sign of its zero or sub-resolution imaginary part) or "arctan2" (arctan2's -pi for a negative
    one, as NumPy's and PyTorch's angle; the reference reading).

  Returns:
    A `Polar` of float32 arrays of re's shape.
  """
  check_phase_cut(cut)
  re, im = jnp.asarray(re, jnp.float32), jnp.asarray(im, jnp.float32)
  if conjugate_pairs:
    re, im = _hermitian_columns(re, im, width)
  power = re * re + im * im
  nonzero = power > ZERO_POWER
  if guard == "floor":
    mean_power = jax.lax.stop_gradient(jnp.mean(power, axis=(1, 2), keepdims=True))
    nonzero = nonzero & (power >= floor * floor * mean_power)
  amplitude, phase, phasor_re, phasor_im = _guarded_unit(re, im, power, nonzero, cut)
  carrier_re, carrier_im = jnp.where(nonzero, re, 0.0), jnp.where(nonzero, im, 0.0)
  if guard == "exact":
    carrier_re, carrier_im = re, im
  elif guard == "reference":
    shifted = re + REFERENCE_PHASE_SHIFT
    _, phase, phasor_re, phasor_im = _guarded_unit(shifted, im, shifted * shifted + im * im, None, cut)
    phase = jnp.where(nonzero, phase, 0.0)
    phasor_re = jnp.where(nonzero, phasor_re, 1.0)
    phasor_im = jnp.where(nonzero, phasor_im, 0.0)
    carrier_re, carrier_im = amplitude * phasor_re, amplitude * phasor_im
  elif guard == "soft":
    eps2 = soft_eps * soft_eps * jnp.mean(power, axis=(1, 2), keepdims=True)
    denom2 = power + eps2
    positive = denom2 > ZERO_POWER
    inv = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, denom2, 1.0)), 0.0)
    phasor_re, phasor_im = re * inv, im * inv
    carrier_re, carrier_im = amplitude * phasor_re, amplitude * phasor_im
  elif guard != "floor":
    raise ConfigError(f"model.phase_guard={guard!r}: expected one of {PHASE_GUARDS}.")
  result = Polar(amplitude, phase, phasor_re, phasor_im, carrier_re, carrier_im, nonzero)
  return _mirror_phases(result, width) if conjugate_pairs else result


def _guarded_unit(re, im, power, nonzero, cut):
  """(|X|, angle(X), re/|X|, im/|X|) with 0, 0, 1, 0 where `nonzero` is False (None: power > ZERO_POWER);
  angle(X) read as `cut` says (`guarded_polar`)."""
  if nonzero is None:
    nonzero = power > ZERO_POWER
  safe_amp = jnp.sqrt(jnp.where(nonzero, power, 1.0))
  safe_re = jnp.where(nonzero, re, 1.0)
  safe_im = jnp.where(nonzero, im, 0.0)
  amplitude = jnp.where(nonzero, safe_amp, 0.0)
  angle = principal_angle(safe_re, safe_im) if cut == "principal" else jnp.arctan2(safe_im, safe_re)
  phase = jnp.where(nonzero, angle, 0.0)
  return amplitude, phase, jnp.where(nonzero, safe_re / safe_amp, 1.0), jnp.where(nonzero, safe_im / safe_amp, 0.0)


def near_cut_fraction(p: Polar, width: int, angle: float) -> jax.Array:
  """Fraction (float32 scalar) of the phase-carrying bins with |P| > pi - angle: where AGP's P (1 + s) jumps.

  Counts the valid bins of the whole [B, H, K, C] grid except the self-conjugate bins (u in {0, H/2} of the
  self-conjugate columns): those are real, and irfft2 reads only the real part of their turned value,
  -|X| cos(P s), which is even in P, so they have no jump. 0 when no bin counts.
  """
  height = p.amplitude.shape[1]
  k_count = p.amplitude.shape[2]
  self_conj = np.zeros((height, k_count), bool)
  rows = [0] + ([height // 2] if height % 2 == 0 else [])
  for k in self_conjugate_columns(width):
    self_conj[rows, k] = True
  counted = p.valid & ~jnp.asarray(self_conj)[None, :, :, None]
  near = counted & (jnp.abs(p.phase) > np.float32(np.pi) - angle)
  total = jnp.sum(counted.astype(jnp.float32))
  return jnp.sum(near.astype(jnp.float32)) / jnp.maximum(total, 1.0)
