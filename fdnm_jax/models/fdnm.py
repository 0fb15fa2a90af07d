"""FDNM: two-stream ResNet + AGP + ANM + BNNeck head (FDNM_SPEC §1), Flax Linen.

Call `model.apply(variables, visible, infrared, train=..., mutable=[...])` with
visible [Bv, H, W, 3] and infrared [Bi, H, W, 3] images (either may be None, not
both). Each modality goes through its own stem; the two are concatenated along
the batch, visible first (B = Bv + Bi), and go through the shared stages, with
`AGP` after each stage in `agp_stages` and `ANM` after stage `anm_stage`.
Initialise with both inputs given, so that both stems get parameters.

Branches
--------
- anm_stage = 0: one branch, the final map.
- anm_stage = k > 0: ANM after layer k gives two nuance maps; the stages after k
  (layer4 for k = 3, none for k = 4) run once on the batch-concatenation
  [original, nuance1, nuance2] (DEEN-style: their BatchNorm statistics are
  taken over all three). The branches are [nuance1, nuance2], or
  [original, nuance1, nuance2] with `anm_keep_original`. The original (pre-ANM
  map, run through the later stages where there are any) is always computed: it
  is the "original" of the center-guided loss.

Head
----
Each branch map is average-pooled to a pre-BN vector g [B, D] (float32). With
`num_parts = P > 0` each branch map is also cut into P horizontal stripes with
PyTorch AdaptiveAvgPool2d((P, 1)) boundaries (stripe j covers rows
floor(j*H/P) .. ceil((j+1)*H/P) - 1), each pooled to its own [B, D] vector.
Entries are ordered group-major: the nb branch globals first, then stripe 0 of
every branch, stripe 1 of every branch, ... (R = nb * (1 + P) entries).
BNNeck: BatchNorm over the feature dim (scale N(1, 0.02), no bias, eps 1e-5), one
module per entry group, shared by the branches of that group and applied once to
their batch-concatenation (as DEEN does): `bnneck` for the globals,
`bnneck_part{j}` for stripe j. Classifier: one bias-free Dense `classifier`
(init N(0, 0.001)) shared by every entry. Test embedding: the concatenation of
the L2-normalised BNNeck outputs of all R entries, [B, R * D].

Parameter tree (top level): `visible_stem`, `infrared_stem`, `layer1..layer4`
(torchvision mapping in resnet.py), `agp{s}` (`gate_0..`), `anm` (`conv1`,
`conv2`, `inorm1`, `inorm2`, `bn`), `bnneck`, `bnneck_part{j}`, `classifier`.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fdnm_jax import run_config
from fdnm_jax.errors import ConfigError
from fdnm_jax.models import frequency
from fdnm_jax.models import resnet
from fdnm_jax.models import spectral

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bnneck_scale_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
  """BNNeck weight init N(1, 0.02) (FDNM_SPEC §3)."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def stripe_bounds(height: int, num_parts: int) -> list[tuple[int, int]]:
  """Row ranges [start, end) of PyTorch AdaptiveAvgPool2d((num_parts, 1)) over `height` rows."""
  return [((j * height) // num_parts, -((-(j + 1) * height) // num_parts)) for j in range(num_parts)]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _pool(feature_map: jax.Array) -> jax.Array:
  return jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))


# How the center-guided loss represents the original (config.model.cnm_original).
CNM_ORIGINALS = ("raw", "batch_standardized")
# The variance guard of the "batch_standardized" original: BatchNorm's epsilon, as ANM's BN.
_STANDARDIZE_EPS = 1e-5


def batch_standardize(feature_map: jax.Array, eps: float = _STANDARDIZE_EPS) -> jax.Array:
  """Per-channel standardisation of a [B, H, W, C] map by its batch statistics over (B, H, W), float32.

  (x - mean) / sqrt(var + eps) with the biased variance: a training-mode BatchNorm with scale 1 and bias 0 and no
  running statistics (the gradient flows through the statistics, as a BatchNorm's does).
  """
  x = feature_map.astype(jnp.float32)
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + eps)


class FDNM(nn.Module):
  """The FDNM network (see the module docstring for the branches and the head).

  Attributes:
    num_classes: training identities (classifier outputs).
    stage_sizes: Bottleneck blocks per stage ((3, 4, 6, 3) = ResNet-50).
    width: stem channels and first-stage bottleneck width (64 = ResNet-50).
    last_stride: stride of the last stage.
    dtype: compute dtype of the backbone; params, FFT math and outputs are float32.
    agp_stages: stages (1-based) followed by an AGP module.
    agp_groups: AGP's gate written as this many C -> C/groups maps.
    anm_stage: stage followed by ANM; 0 = no ANM.
    anm_keep_original: the original map is a branch (ID + triplet losses, embedding).
    num_parts: horizontal stripes pooled as extra entries; 0 = global only.
    bn_momentum: BatchNorm running-average decay (Flax convention; 0.9 = PyTorch 0.1).
    spectral_transform: how AGP and ANM compute their 2-D FFTs: "fft" (jnp.fft) or
      "dft_matmul" (DFT matrix products: the same transform to float32 rounding, faster on the CPU; AGP/ANM
      outputs can still differ where a bin is rounding noise, see the frequency module's docstring).
    anm_bn: ANM's BatchNorm over its two nuance maps, one of frequency.ANM_BN_MODES (`frequency.ANM.bn_mode`):
      "reference" (one BN called per branch), "joint" (one BN over both branches at once), "per_branch" (a BN
      per branch), "none".
    anm_inorm_stats: ANM's instance-norm statistics, one of frequency.ANM_INORM_STATS (`frequency.ANM.inorm_stats`).
    phase_guard, phase_floor, phase_soft_eps: how AGP and ANM treat the phase of near-zero spectrum bins, one
      of spectral.PHASE_GUARDS with its floor / softening constant (fractions of a channel's RMS amplitude;
      `frequency.AGP.phase_guard`, ...).
    conjugate_pairs: AGP/ANM treat the Hermitian-paired bins of the real FFT as one (`frequency.AGP`).
    phase_cut: AGP's phase of a bin on the negative real axis, one of spectral.PHASE_CUTS (`frequency.AGP.phase_cut`).
    cnm_original: the original's representation in the center-guided loss ("cnm_original" output), one of
      CNM_ORIGINALS: "raw" (the pooled original map, the reference reading) or "batch_standardized" (the original
      map standardised per channel by its batch statistics, `batch_standardize`, then pooled: the space of the
      nuances, which leave ANM through a BatchNorm, with that BatchNorm's init scale 1 and bias 0).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  last_stride: int = 1
  dtype: Dtype = jnp.float32
  agp_stages: Sequence[int] = ()
  agp_groups: int = 4
  anm_stage: int = 0
  anm_keep_original: bool = False
  num_parts: int = 0
  bn_momentum: float = 0.9
  spectral_transform: str = "fft"
  anm_bn: str = "reference"
  anm_inorm_stats: str = "instance"
  phase_guard: str = "exact"
  phase_floor: float = 1e-4
  phase_soft_eps: float = 1e-4
  conjugate_pairs: bool = False
  phase_cut: str = "arctan2"
  cnm_original: str = "raw"

  def _validate(self) -> None:
    num_stages = len(self.stage_sizes)
    if not 0 <= self.anm_stage <= num_stages:
      raise ConfigError(f"model.anm_stage={self.anm_stage}: expected 0 (no ANM) or a stage in 1..{num_stages}.")
    bad = [s for s in self.agp_stages if not 1 <= s <= num_stages]
    if bad:
      raise ConfigError(f"model.agp_stages={tuple(self.agp_stages)}: stages {bad} are not in 1..{num_stages}.")
    if self.anm_keep_original and not self.anm_stage:
      raise ConfigError("model.anm_keep_original=True needs ANM: set model.anm_stage > 0.")
    if self.num_parts < 0:
      raise ConfigError(f"model.num_parts={self.num_parts}: expected >= 0.")
    if self.cnm_original not in CNM_ORIGINALS:
      raise ConfigError(f"model.cnm_original={self.cnm_original!r}: expected one of {CNM_ORIGINALS}.")
    frequency.check_spectral_transform(self.spectral_transform)
    frequency.check_anm_options(self.anm_bn, self.anm_inorm_stats)
    spectral.check_phase_guard(self.phase_guard, self.phase_floor, self.phase_soft_eps)
    spectral.check_phase_cut(self.phase_cut)

  def _phase_options(self) -> dict[str, Any]:
    """The attributes AGP and ANM share: the FFT and the near-zero-bin phase treatment."""
    return dict(transform=self.spectral_transform, phase_guard=self.phase_guard, phase_floor=self.phase_floor,
                phase_soft_eps=self.phase_soft_eps, conjugate_pairs=self.conjugate_pairs)

  def _bnneck(self, name: str, train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                        use_bias=False, scale_init=bnneck_scale_init, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)

  def backbone(self, visible: jax.Array | None, infrared: jax.Array | None,
               train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Stems, stages, AGP and ANM: (original map [B, h, w, D], the N nuance maps [B, h, w, D] each).

    With ANM after stage k < last, the stages after k run once on [original, nuance1, nuance2] (module
    docstring); the original is the pre-ANM map carried through them.
    """
    x = resnet.concat_streams(visible, infrared, self.width, self.dtype, self.bn_momentum, train)
    streams = 1
    num_stages = len(self.stage_sizes)
    for i, num_blocks in enumerate(self.stage_sizes, start=1):
      x = resnet.make_stage(i, num_blocks, self.width, self.last_stride, num_stages, self.dtype,
                            self.bn_momentum)(x, train=train)
      if i in self.agp_stages:
        x = frequency.AGP(groups=self.agp_groups, phase_cut=self.phase_cut, name=f"agp{i}",
                          **self._phase_options())(x)
      if i == self.anm_stage:
        nuance1, nuance2 = frequency.ANM(dtype=self.dtype, bn_momentum=self.bn_momentum, bn_mode=self.anm_bn,
                                           inorm_stats=self.anm_inorm_stats, name="anm",
                                           **self._phase_options())(x, train=train)
        x = jnp.concatenate([x, nuance1, nuance2], axis=0)
        streams = 3
    maps = jnp.split(x, streams, axis=0)
    return maps[0], list(maps[1:])

  def branches(self, original: jax.Array, nuance_maps: list[jax.Array]) -> list[jax.Array]:
    """The branch maps of the head: the nuances (ANM) or the original, with the original first if kept."""
    branches = list(nuance_maps) if self.anm_stage else [original]
    if self.anm_keep_original:
      branches = [original] + branches
    return branches

  def pool_entries(self, branches: list[jax.Array]) -> tuple[list[jax.Array], list[list[jax.Array]]]:
    """Average pooling: (globals [B, D] per branch, stripes[j][branch] [B, D] for j < num_parts), float32."""
    height = branches[0].shape[1]
    if self.num_parts > height:
      raise ConfigError(f"model.num_parts={self.num_parts} exceeds the final map height {height}.")
    global_feats = [_pool(m) for m in branches]
    part_feats = [[_pool(m[:, start:end]) for m in branches]
                  for start, end in stripe_bounds(height, self.num_parts)]
    return global_feats, part_feats

  def head(self, global_feats: list[jax.Array], part_feats: list[list[jax.Array]],
           train: bool) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """BNNeck per entry group and the shared classifier: (entries [B, D], their BNNeck outputs [B, D], logits
    [R * B, num_classes]), entries group-major (module docstring)."""
    num_branches = len(global_feats)
    groups = [("bnneck", global_feats)] + [(f"bnneck_part{j}", p) for j, p in enumerate(part_feats)]
    entries, normed = [], []
    for name, feats in groups:
      bn_out = self._bnneck(name, train)(jnp.concatenate(feats, axis=0))
      entries.extend(feats)
      normed.extend(jnp.split(bn_out, num_branches, axis=0))
    classifier = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(0.001), name="classifier")
    return entries, normed, classifier(jnp.concatenate(normed, axis=0))

  def cnm_original_features(self, original: jax.Array) -> jax.Array:
    """The original's [B, D] features for the center-guided loss (`cnm_original`)."""
    if self.cnm_original == "batch_standardized":
      return _pool(batch_standardize(original))
    return _pool(original)

  @nn.compact
  def __call__(self, visible: jax.Array | None, infrared: jax.Array | None,
               train: bool = False) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      visible: [Bv, H, W, 3] visible images (normalised), or None.
      infrared: [Bi, H, W, 3] infrared images, or None (not both None).
      train: batch statistics in every BatchNorm (pass mutable=["batch_stats"]; add "diagnostics" to collect
        AGP's `agp_near_cut_fraction`).

    Returns:
      All float32, B = Bv + Bi (visible rows first), D = final channels,
      nb = branches, P = num_parts, R = nb * (1 + P):
      "global": [B, D] pre-BN pooled original map (pre-ANM map / original branch).
      "cnm_original": [B, D] the original as the center-guided loss sees it (`cnm_original`; "raw" = "global").
      "nuances": [N, B, D] pre-BN pooled nuance maps (N = 2 with ANM, else 0).
      "features": [R, B, D] pre-BN entries for ID + triplet losses (group-major).
      "part_features": [P, nb, B, D] the stripe entries again, by stripe and branch.
      "logits": [R, B, num_classes] classifier outputs of the BNNeck features.
      "embedding": [B, R * D] concatenated L2-normalised BNNeck features.
    """
    self._validate()
    original, nuance_maps = self.backbone(visible, infrared, train)
    branches = self.branches(original, nuance_maps)
    global_feats, part_feats = self.pool_entries(branches)
    entries, normed, logits = self.head(global_feats, part_feats, train)
    batch, dim = global_feats[0].shape
    return {
        "global": _pool(original),
        "cnm_original": self.cnm_original_features(original),
        "nuances": (jnp.stack([_pool(m) for m in nuance_maps]) if nuance_maps
                    else jnp.zeros((0, batch, dim), jnp.float32)),
        "features": jnp.stack(entries),
        "part_features": (jnp.stack([jnp.stack(p) for p in part_feats]) if part_feats
                          else jnp.zeros((0, len(branches), batch, dim), jnp.float32)),
        "logits": logits.reshape(len(entries), batch, self.num_classes),
        "embedding": jnp.concatenate([l2_normalize(n) for n in normed], axis=-1),
    }


FDNMTiny = functools.partial(FDNM, stage_sizes=(1, 1, 1, 1), width=8)


def fdnm_from_config(model_config: ml_collections.ConfigDict, num_classes: int) -> FDNM:
  """Builds `FDNM` from the `config.model` section (`pretrained` is ignored here).

  Args:
    model_config: `config.model` (stage_sizes, width, last_stride, dtype, agp_stages,
      agp_groups, anm_stage, anm_keep_original, num_parts, bn_momentum, spectral_transform, anm_bn,
      anm_inorm_stats, phase_guard, phase_floor, phase_soft_eps, conjugate_pairs, phase_cut, cnm_original). Fields a
      config.json written before they existed lacks get their reference values (run_config.LEGACY_VALUES).
    num_classes: training identities.
  """
  if model_config.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={model_config.dtype!r}: expected one of {sorted(DTYPES)}.")
  model = FDNM(
      num_classes=num_classes,
      stage_sizes=tuple(model_config.stage_sizes),
      width=model_config.width,
      last_stride=model_config.last_stride,
      dtype=DTYPES[model_config.dtype],
      agp_stages=tuple(model_config.agp_stages),
      agp_groups=model_config.agp_groups,
      anm_stage=model_config.anm_stage,
      anm_keep_original=model_config.anm_keep_original,
      num_parts=model_config.num_parts,
      bn_momentum=model_config.bn_momentum,
      # config.json files written before the field existed have no spectral_transform.
      spectral_transform=model_config.get("spectral_transform", "fft"),
      phase_floor=model_config.get("phase_floor", FDNM.phase_floor),
      phase_soft_eps=model_config.get("phase_soft_eps", FDNM.phase_soft_eps),
      **{field: model_config.get(field, value) for field, value in run_config.REFERENCE_READING.items()},
  )
  model._validate()
  return model
