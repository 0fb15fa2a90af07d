"""FDNM's frequency-domain layers, AGP and ANM (FDNM_SPEC §1.2, §1.3), on NHWC maps.

Both transform the spatial axes H, W of a map x [B, H, W, C] with
`X = rfft2(x, axes=(1, 2), norm="ortho")` and come back with
`irfft2(., s=(H, W), axes=(1, 2), norm="ortho")` (fdnm_jax/models/spectral.py: how the spectrum is computed,
and how it is read as amplitude and phase). Every FFT-domain operation runs in float32 whatever the compute
dtype (the map is cast to float32 on the way in and back to its own dtype on the way out): complex bfloat16
is not supported.

Phases of noise bins (`phase_guard`, `conjugate_pairs`; spectral.guarded_polar). ANM gives every bin the O(1)
amplitude of its normalised amplitude mix whatever |X| was, with the phase of X. Where |X| is float rounding
noise (a map constant along an axis has such bins), that phase is noise, so with the spec's exact phase
("exact") the outputs depend on how the transform was computed: `jnp.fft` vs the DFT products of
`spectral_transform="dft_matmul"`, CPU type, device count, JAX vs PyTorch. The modules' default "exact" reproduces
the spec (and old checkpoints' function) bit for bit; "floor" makes them agree, and is the config default
(configs/default.py: phase_guard="floor", phase_floor=1e-4, conjugate_pairs=True). Measured (post-ReLU, structured
and N(0, 1) maps, 4 x 32 channels, ANM at 18x9 / 24x9 in train mode): ANM's fft vs dft_matmul max difference
6.4 (post-ReLU) / 11 (structured) with "exact", 1.7 / 3.3 "reference", 3e-2..3e-4 "soft" (eps 1e-4..1e-2),
1.2e-5 / 1.7e-5 (outputs of scale ~10) with "floor" at 1e-5, 1e-4 and 1e-3; against the float64 spec the floor
at 1e-3 already departs by 0.11 on post-ReLU maps (1e-4: 1.2e-5, as "exact"), on N(0, 1) maps every floor
stays at float32 noise (2.4e-6). `conjugate_pairs` changed none of these figures; it removes the dependence on
the anti-Hermitian rounding of the self-conjugate columns (tests/models/test_frequency.py).

AGP's own discontinuity: angle(X) jumps from pi to -pi across the negative real axis, and P (1 + s) turns
that into a jump of y for bins on it. It belongs to the formula and is kept; each call sows the fraction of
bins within `near_cut_angle` of the cut (`spectral.near_cut_fraction`) into the "diagnostics" collection.
Sparse post-ReLU maps put bins exactly on it (a blob at h = H/2 makes every odd row real and negative; zero odd
columns make bins of the others real): there arctan2 reads -pi or +pi by the sign of a zero or of rounding noise,
so AGP's fft vs dft_matmul outputs differed by 0.18 whatever the guard (3.7e-4 of the bins within 1e-3 rad).
`phase_cut="principal"` reads such bins as +pi (`spectral.principal_angle`): the transforms and NumPy's float64
then agree wherever the transform's noise there is below float32's angle step (power-of-two sizes;
tests/models/test_frequency.py). "arctan2" (the config default and the reference reading) keeps the sign reading;
the demo's metrics over seeds did not favour either (docs/benchmarks.md, issue 17, ninth pass).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdnm_jax.errors import ConfigError
from fdnm_jax.models import linear
from fdnm_jax.models import spectral
from fdnm_jax.models.spectral import PHASE_GUARDS
from fdnm_jax.models.spectral import SPECTRAL_TRANSFORMS
from fdnm_jax.models.spectral import check_spectral_transform
from fdnm_jax.models.spectral import polar

# The spectral names are importable from here as before the split into spectral.py (fdnm.py, tests).
__all__ = ["AGP", "ANM", "ANM_BN_MODES", "ANM_INORM_STATS", "PHASE_GUARDS", "SPECTRAL_TRANSFORMS",
           "check_anm_options", "check_spectral_transform", "polar"]

Dtype = Any

# ANM's BatchNorm after the inverse transform (config model.anm_bn); see ANM.
ANM_BN_MODES = ("reference", "joint", "per_branch", "none")

# Statistics of ANM's instance norm over the amplitude grid (config model.anm_inorm_stats); see ANM.
ANM_INORM_STATS = ("instance", "exclude_dc")

# PyTorch's default Conv2d/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_anm_options(bn_mode: str, inorm_stats: str) -> None:
  """Raises ConfigError naming `model.anm_bn` / `model.anm_inorm_stats` unless each is one of its modes."""
  if bn_mode not in ANM_BN_MODES:
    raise ConfigError(f"model.anm_bn={bn_mode!r}: expected one of {ANM_BN_MODES}.")
  if inorm_stats not in ANM_INORM_STATS:
    raise ConfigError(f"model.anm_inorm_stats={inorm_stats!r}: expected one of {ANM_INORM_STATS}.")


class AGP(nn.Module):
  """Amplitude Guided Phase (FDNM_SPEC §1.2): a channel gate from the amplitude rescales the phase.

  For x [B, H, W, C]: X = rfft2(x), A = |X|, P = angle(X), a = mean of A over the
  frequency grid [B, C], s = sigmoid(W a), P' = P * s + P, y = irfft2(A exp(i P')),
  computed as irfft2(X exp(i P s)): equal, as A exp(i P) = X (only at the guarded
  bins with 0 < |X|^2 <= 1e-30 it keeps X, below 1e-15, where the formula gives 0).
  With another `phase_guard`, A, P and A exp(i P) are those of `spectral.guarded_polar`
  (a floored bin gives 0). No residual or norm. Same shape and dtype as x.

  W is a bias-free C -> C linear map written as `groups` parallel maps
  `gate_0 .. gate_{groups-1}`, each seeing the full C-vector a and producing
  C / groups outputs, concatenated in order: a C x C matrix split column-wise
  into groups, C*C weights in total (the reference's `groups` 1x1 convs
  C -> C/groups). Each kernel is [C, C/groups]. Kernels use PyTorch's default
  conv init U(+-1/sqrt(C)) (the spec is silent).

  The formula's own discontinuity: angle(X) jumps from pi to -pi across the
  negative real axis, and P * (1 + s) turns that jump into a jump of y for
  bins on it (not for the self-conjugate bins, whose real part irfft2 reads is
  even in P). Each call (not init) sows `spectral.near_cut_fraction` as
  "diagnostics"/"agp_near_cut_fraction" (float32 scalar).

  Attributes:
    groups: number of parallel C -> C/groups gate maps (C must be divisible).
    transform: how the 2-D FFTs are computed, one of SPECTRAL_TRANSFORMS (`rfft2`).
    phase_guard, phase_floor, phase_soft_eps, conjugate_pairs: how X is read as A and P
      (`spectral.guarded_polar`); "exact" without pairs is the spec.
    phase_cut: the phase of a bin exactly on the negative real axis, one of spectral.PHASE_CUTS: "principal"
      (+pi, `spectral.principal_angle`) or "arctan2" (-pi where its imaginary part is -0.0 or negative noise
      below float32's angle step: the sign of a zero, which the transform's rounding picks; the reference reading).
    near_cut_angle: the angle (rad) from the negative real axis within which a bin counts as near the cut.
  """

  groups: int = 4
  transform: str = "fft"
  phase_guard: str = "exact"
  phase_floor: float = 1e-4
  phase_soft_eps: float = 1e-4
  conjugate_pairs: bool = False
  phase_cut: str = "arctan2"
  near_cut_angle: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies AGP to x [B, H, W, C] (any float dtype); returns [B, H, W, C] in x.dtype."""
    _, height, width, channels = x.shape
    if channels % self.groups:
      raise ConfigError(f"AGP: {channels} channels are not divisible by agp_groups={self.groups}.")
    spectral.check_phase_guard(self.phase_guard, self.phase_floor, self.phase_soft_eps)
    re, im = spectral.rfft2(x, self.transform)
    p = spectral.guarded_polar(re, im, width, self.phase_guard, self.phase_floor, self.phase_soft_eps,
                               self.conjugate_pairs, self.phase_cut)
    mean_amplitude = jnp.mean(p.amplitude, axis=(1, 2))
    logits = jnp.concatenate(
        [
            nn.Dense(channels // self.groups, use_bias=False, dtype=jnp.float32,
                     param_dtype=jnp.float32, kernel_init=torch_default_kernel_init,
                     precision=jax.lax.Precision.HIGHEST, name=f"gate_{g}")(mean_amplitude)
            for g in range(self.groups)
        ],
        axis=-1,
    )
    if not self.is_initializing():
      self.sow("diagnostics", "agp_near_cut_fraction",
               spectral.near_cut_fraction(p, width, self.near_cut_angle))
    turn = p.phase * nn.sigmoid(logits)[:, None, None, :]
    # A exp(i (P s + P)) = (A exp(i P)) exp(i P s): the amplitude itself only feeds the gate.
    cos_turn, sin_turn = jnp.cos(turn), jnp.sin(turn)
    rotated_re = p.carrier_re * cos_turn - p.carrier_im * sin_turn
    rotated_im = p.carrier_re * sin_turn + p.carrier_im * cos_turn
    return spectral.irfft2(rotated_re, rotated_im, height, width, self.transform).astype(x.dtype)


class _ExcludeDCNorm(nn.Module):
  """Affine instance norm over the [H, K] grid of [B, H, K, C] whose mean and biased variance skip bin (0, 0).

  The statistics come from the H K - 1 non-DC bins, per sample and channel; they are applied to every bin,
  the DC bin included. Parameters `scale`, `bias` [C] as nn.InstanceNorm's, so the two read one checkpoint.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    weight = np.ones(x.shape[1:3], np.float32)
    weight[0, 0] = 0.0
    count = float(weight.sum())  # from the NumPy mask: a jnp sum would be a tracer under jax.jit.
    weight = jnp.asarray(weight)[None, :, :, None]
    mean = jnp.sum(x * weight, axis=(1, 2), keepdims=True) / count
    var = jnp.sum(weight * jnp.square(x - mean), axis=(1, 2), keepdims=True) / count
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ANM(nn.Module):
  """Amplitude Nuances Mining (FDNM_SPEC §1.3): two amplitude-remixed views of one map.

  For f [B, H, W, C]: X = rfft2(f), A = |X|, P = angle(X); for i = 1, 2:
  A_i = InstanceNorm_i(Conv1x1_i(A)), f_i = BN(irfft2(A_i exp(i P))).
  exp(i P) is computed as the unit phasor X / |X| (no angle needed); with another
  `phase_guard`, A and the phasor are those of `spectral.guarded_polar`.

  The BN (`bn_mode`, config model.anm_bn; the spec has "one BN shared by both branches"):
    "reference": one BN `bn` called once per branch (as the PyTorch code calling it twice): per-branch
      batch statistics in training, running averages updated twice per step, so eval normalises both
      branches with the average of the two branches' statistics, not what training used.
    "joint": one BN `bn` called once on the branches' batch-concatenation [f_1; f_2] (as the BNNeck and
      DEEN do): one set of statistics in training and at test.
    "per_branch": a BN per branch, `bn1`, `bn2`.
    "none": no BN (the second public reimplementation has none); outputs are the irfft2 maps.
  The instance norm's statistics (`inorm_stats`, config model.anm_inorm_stats): "instance" (mean and
  biased variance over the whole [H, K] amplitude grid, nn.InstanceNorm) or "exclude_dc" (over the non-DC
  bins, applied to all): the DC bin is the only one a pooled ANM map reads, and for post-ReLU maps it is an
  outlier of the grid that the full-grid norm squashes towards sqrt(H K - 1) scale + bias.

  Submodules: `conv1`, `conv2` (bias-free C -> C 1x1 convs on the amplitude,
  written as Dense layers with kernel [C_in, C_out], i.e. a PyTorch weight
  w[:, :, 0, 0].T; PyTorch default init), `inorm1`, `inorm2` (affine instance norm over the
  frequency grid per sample and channel, eps 1e-5, biased variance), `bn` or `bn1`, `bn2`
  (BatchNorm2d, eps 1e-5).

  Attributes:
    dtype: dtype of the BN and of the outputs; the FFT math is float32.
    bn_momentum: running-average decay of the BN (Flax convention).
    transform: how the 2-D FFTs are computed, one of SPECTRAL_TRANSFORMS (`rfft2`).
    bn_mode: one of ANM_BN_MODES (above).
    inorm_stats: one of ANM_INORM_STATS (above).
    phase_guard, phase_floor, phase_soft_eps, conjugate_pairs: how X is read as A and the phasor
      (`spectral.guarded_polar`); "exact" without pairs is the spec.
  """

  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  transform: str = "fft"
  bn_mode: str = "reference"
  inorm_stats: str = "instance"
  phase_guard: str = "exact"
  phase_floor: float = 1e-4
  phase_soft_eps: float = 1e-4
  conjugate_pairs: bool = False

  def _bn(self, name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=jnp.float32, name=name)

  @nn.compact
  def __call__(self, f: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns the two nuance maps (f_1, f_2), each [B, H, W, C] in `dtype`."""
    check_anm_options(self.bn_mode, self.inorm_stats)
    spectral.check_phase_guard(self.phase_guard, self.phase_floor, self.phase_soft_eps)
    _, height, width, channels = f.shape
    re, im = spectral.rfft2(f, self.transform)
    p = spectral.guarded_polar(re, im, width, self.phase_guard, self.phase_floor, self.phase_soft_eps,
                               self.conjugate_pairs)
    if self.bn_mode == "reference":
      shared = self._bn("bn", train)
    maps = []
    for i in (1, 2):
      mixed = linear.ChannelDense(channels, kernel_init=torch_default_kernel_init,
                                  precision=jax.lax.Precision.HIGHEST, name=f"conv{i}")(p.amplitude)
      if self.inorm_stats == "instance":
        mixed = nn.InstanceNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                                use_fast_variance=False, name=f"inorm{i}")(mixed)
      else:
        mixed = _ExcludeDCNorm(epsilon=1e-5, name=f"inorm{i}")(mixed)
      y = spectral.irfft2(mixed * p.phasor_re, mixed * p.phasor_im, height, width, self.transform)
      if self.bn_mode == "reference":
        y = shared(y)
      elif self.bn_mode == "per_branch":
        y = self._bn(f"bn{i}", train)(y)
      maps.append(y)
    if self.bn_mode == "joint":
      joint = self._bn("bn", train)(jnp.concatenate(maps, axis=0))
      maps = jnp.split(joint, 2, axis=0)
    return maps[0].astype(self.dtype), maps[1].astype(self.dtype)
