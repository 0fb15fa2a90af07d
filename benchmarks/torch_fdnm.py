"""The FDNM model, losses and SGD step of fdnm-jax written again in PyTorch eager: the reference of the
train-step benchmark (`benchmarks/train_step.py`) and of `tests/test_torch_reference.py`.

Same network as `fdnm_jax.models.FDNM` (two stems, torchvision Bottleneck stages, AGP after `agp_stages`, ANM after
`anm_stage`, average-pooled branches and stripes, BNNeck per entry group, one bias-free classifier), the same AGP/ANM
math (float32 FFTs with norm="ortho", guarded amplitude/phase with the same 1e-30 power threshold), the same losses
as `fdnm_jax.losses.total_loss` with the batch-hard triplet (CE + triplet + center-guided nuances mining +
orthogonality) and the same SGD (momentum, Nesterov, L2 weight decay added to the gradient, backbone / head
learning rates). Maps are NCHW (optionally stored channels_last); torch module names mirror the Flax paths
(`layer1.block0.conv1`, `agp1.gate`, `anm.inorm1`, `bnneck`, ...), so `load_flax_variables` copies a Flax
variable tree in by name. Not a general PyTorch library: only what the benchmark and the parity test need.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from fdnm_jax import run_config

ZERO_POWER = 1e-30  # as fdnm_jax.models.frequency._ZERO_POWER
EXPANSION = 4


def _bn(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class Stem(nn.Module):
  """conv1 7x7/2 -> bn1 -> ReLU -> max-pool 3x3/2 (pad 1): [B, 3, H, W] -> [B, width, H/4, W/4]."""

  def __init__(self, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = _bn(width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (stride on the 3x3 conv); downsample as `downsample_conv` + `downsample_bn`."""

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    out = width * EXPANSION
    self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
    self.bn1 = _bn(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = _bn(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = _bn(out)
    self.has_downsample = stride != 1 or in_channels != out
    if self.has_downsample:
      self.downsample_conv = nn.Conv2d(in_channels, out, 1, stride=stride, bias=False)
      self.downsample_bn = _bn(out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    residual = self.downsample_bn(self.downsample_conv(x)) if self.has_downsample else x
    return F.relu(y + residual)


def _polar(spectrum: torch.Tensor) -> tuple[torch.Tensor, ...]:
  """Guarded (amplitude, phase, cos, sin) of a complex spectrum, as fdnm_jax.models.frequency.polar."""
  re, im = spectrum.real, spectrum.imag
  power = re * re + im * im
  nonzero = power > ZERO_POWER
  safe_amp = torch.sqrt(torch.where(nonzero, power, torch.ones_like(power)))
  amplitude = torch.where(nonzero, safe_amp, torch.zeros_like(power))
  safe_re = torch.where(nonzero, re, torch.ones_like(re))
  safe_im = torch.where(nonzero, im, torch.zeros_like(im))
  phase = torch.where(nonzero, torch.atan2(safe_im, safe_re), torch.zeros_like(re))
  cos_phase = torch.where(nonzero, safe_re / safe_amp, torch.ones_like(re))
  sin_phase = torch.where(nonzero, safe_im / safe_amp, torch.zeros_like(im))
  return amplitude, phase, cos_phase, sin_phase


def _spectral_dtype(x: torch.Tensor) -> torch.dtype:
  """float32 for float32 and narrower maps (as fdnm-jax), float64 for a float64 model (the parity test's)."""
  return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rfft2(x: torch.Tensor) -> torch.Tensor:
  return torch.fft.rfft2(x.to(_spectral_dtype(x)), dim=(-2, -1), norm="ortho")


def _irfft2(spectrum: torch.Tensor, height: int, width: int) -> torch.Tensor:
  return torch.fft.irfft2(spectrum, s=(height, width), dim=(-2, -1), norm="ortho")


class AGP(nn.Module):
  """Amplitude Guided Phase: y = irfft2(A exp(i P (1 + sigmoid(W mean(A))))); `gate` is the C x C map W."""

  def __init__(self, channels: int):
    super().__init__()
    self.gate = nn.Linear(channels, channels, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    amplitude, phase, _, _ = _polar(_rfft2(x))
    gate = torch.sigmoid(self.gate(amplitude.mean(dim=(-2, -1))))[:, :, None, None]
    new_phase = phase * gate + phase
    spectrum = torch.complex(amplitude * torch.cos(new_phase), amplitude * torch.sin(new_phase))
    return _irfft2(spectrum, height, width).to(x.dtype)


class ANM(nn.Module):
  """Amplitude Nuances Mining: f_i = BN(irfft2(InstanceNorm_i(Conv1x1_i(A)) X/|X|)), i = 1, 2, one shared BN."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
    self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
    self.inorm1 = nn.InstanceNorm2d(channels, eps=1e-5, affine=True)
    self.inorm2 = nn.InstanceNorm2d(channels, eps=1e-5, affine=True)
    self.bn = _bn(channels)

  def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = f.shape[-2:]
    amplitude, _, cos_phase, sin_phase = _polar(_rfft2(f))
    outputs = []
    for conv, inorm in ((self.conv1, self.inorm1), (self.conv2, self.inorm2)):
      mixed = inorm(conv(amplitude))
      outputs.append(self.bn(_irfft2(torch.complex(mixed * cos_phase, mixed * sin_phase), height, width)))
    return outputs[0], outputs[1]


def stripe_bounds(height: int, num_parts: int) -> list[tuple[int, int]]:
  """Row ranges of AdaptiveAvgPool2d((num_parts, 1)), as fdnm_jax.models.fdnm.stripe_bounds."""
  return [((j * height) // num_parts, -((-(j + 1) * height) // num_parts)) for j in range(num_parts)]


class TorchFDNM(nn.Module):
  """FDNM in PyTorch (see the module docstring); forward returns the same dict as the Flax model (B first)."""

  def __init__(self, num_classes: int, stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64,
               last_stride: int = 1, agp_stages: Sequence[int] = (1, 2), anm_stage: int = 4,
               anm_keep_original: bool = False, num_parts: int = 0):
    super().__init__()
    self.stage_sizes = tuple(stage_sizes)
    self.agp_stages = tuple(agp_stages)
    self.anm_stage = anm_stage
    self.anm_keep_original = anm_keep_original
    self.num_parts = num_parts
    self.visible_stem = Stem(width)
    self.infrared_stem = Stem(width)
    in_channels = width
    num_stages = len(stage_sizes)
    for i, num_blocks in enumerate(stage_sizes, start=1):
      stride = 1 if i == 1 else (last_stride if i == num_stages else 2)
      w = width * 2 ** (i - 1)
      blocks = nn.Module()
      for b in range(num_blocks):
        setattr(blocks, f"block{b}", Bottleneck(in_channels, w, stride if b == 0 else 1))
        in_channels = w * EXPANSION
      setattr(self, f"layer{i}", blocks)
      if i in self.agp_stages:
        setattr(self, f"agp{i}", AGP(in_channels))
      if i == anm_stage:
        self.anm = ANM(in_channels)
    self.bnneck = self._bnneck(in_channels)
    for j in range(num_parts):
      setattr(self, f"bnneck_part{j}", self._bnneck(in_channels))
    self.classifier = nn.Linear(in_channels, num_classes, bias=False)

  @staticmethod
  def _bnneck(channels: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(channels, eps=1e-5, momentum=0.1)
    bn.bias.requires_grad_(False)  # Flax use_bias=False: a fixed zero shift.
    return bn

  def forward(self, visible: torch.Tensor, infrared: torch.Tensor) -> dict[str, torch.Tensor]:
    """visible, infrared [b, 3, H, W] -> the outputs of `fdnm_jax.models.FDNM` (same keys and shapes)."""
    x = torch.cat([self.visible_stem(visible), self.infrared_stem(infrared)], dim=0)
    streams = 1
    for i, num_blocks in enumerate(self.stage_sizes, start=1):
      stage = getattr(self, f"layer{i}")
      for b in range(num_blocks):
        x = getattr(stage, f"block{b}")(x)
      if i in self.agp_stages:
        x = getattr(self, f"agp{i}")(x)
      if i == self.anm_stage:
        nuance1, nuance2 = self.anm(x)
        x = torch.cat([x, nuance1, nuance2], dim=0)
        streams = 3
    maps = torch.chunk(x, streams, dim=0)
    original, nuance_maps = maps[0], list(maps[1:])
    branches = nuance_maps if self.anm_stage else [original]
    if self.anm_keep_original:
      branches = [original] + branches
    num_branches = len(branches)

    def pool(m: torch.Tensor) -> torch.Tensor:
      return m.to(_spectral_dtype(m)).mean(dim=(2, 3))

    global_feats = [pool(m) for m in branches]
    height = original.shape[2]
    part_feats = [[pool(m[:, :, start:end]) for m in branches] for start, end in stripe_bounds(height, self.num_parts)]
    groups = [(self.bnneck, global_feats)] + [(getattr(self, f"bnneck_part{j}"), p) for j, p in enumerate(part_feats)]
    entries, normed = [], []
    for bn, feats in groups:
      entries.extend(feats)
      normed.extend(torch.chunk(bn(torch.cat(feats, dim=0)), num_branches, dim=0))
    batch = original.shape[0]
    logits = self.classifier(torch.cat(normed, dim=0))
    return {
        "global": pool(original),
        "nuances": torch.stack([pool(m) for m in nuance_maps]) if nuance_maps else None,
        "features": torch.stack(entries),
        "logits": logits.reshape(len(entries), batch, -1),
        "embedding": torch.cat([F.normalize(n, dim=-1) for n in normed], dim=-1),
        "num_branches": num_branches,
    }


# --- losses (fdnm_jax/losses.py) ----------------------------------------------------------------------------------

def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return torch.sqrt(torch.clamp(sq, min=1e-12))


def _row_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  return torch.sqrt(torch.clamp(((a - b) ** 2).sum(1), min=1e-12))


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
  dist = pairwise_distance(features, features)
  same = labels[:, None] == labels[None, :]
  d_ap = torch.where(same, dist, torch.full_like(dist, -torch.inf)).amax(1)
  has_neg = (~same).any(1)
  d_an = torch.where(same, torch.full_like(dist, torch.inf), dist).amin(1)
  d_an = torch.where(has_neg, d_an, torch.zeros_like(d_an))
  return torch.where(has_neg, F.relu(d_ap - d_an + margin), torch.zeros_like(d_an)).mean()


def center_nuances_mining(original: torch.Tensor, nuance: torch.Tensor, labels: torch.Tensor,
                          modality: torch.Tensor, margin: float) -> torch.Tensor:
  batch = labels.shape[0]
  same_id = labels[:, None] == labels[None, :]

  def centers(mod: int):
    weights = (same_id & (modality == mod)[None, :]).to(original.dtype)
    count = weights.sum(1)
    weights = weights / torch.clamp(count, min=1.0)[:, None]
    return weights @ original, weights @ nuance, count

  c1, c3, count_vis = centers(0)
  c2, c4, count_ir = centers(1)
  earlier = torch.tril(torch.ones(batch, batch, dtype=torch.bool), diagonal=-1)
  first_slot = ~(same_id & earlier).any(1)
  valid = first_slot & (count_vis > 0) & (count_ir > 0)
  neg = valid[:, None] & valid[None, :] & ~same_id
  has_neg = neg.any(1)
  used = valid & has_neg

  def hardest_negative(c):
    d = torch.where(neg, pairwise_distance(c, c), torch.full((batch, batch), torch.inf)).amin(1)
    return torch.where(has_neg, d, torch.zeros_like(d))

  def hinge(x):
    return F.relu(x + margin)

  d23 = _row_distance(c2, c3)
  d13 = _row_distance(c1, c3).detach()
  l123 = hinge(d23 - d13) + 0.5 * (hinge(d23 - hardest_negative(c3)) + hinge(d23 - hardest_negative(c1)))
  d14 = _row_distance(c1, c4)
  d24 = _row_distance(c2, c4).detach()
  l124 = hinge(d14 - d24) + 0.5 * (hinge(d14 - hardest_negative(c4)) + hinge(d14 - hardest_negative(c2)))
  per_identity = torch.where(used, 0.5 * (l123 + l124), torch.zeros_like(l123))
  return per_identity.sum() / torch.clamp(used.sum(), min=1)


def total_loss(outputs: dict[str, Any], labels: torch.Tensor, modality: torch.Tensor,
               loss_config: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """fdnm_jax.losses.total_loss with loss.triplet = "hard" (the default)."""
  if loss_config.triplet != "hard":
    raise ValueError(f"loss.triplet={loss_config.triplet!r}: the torch reference implements 'hard' only.")
  logits = outputs["logits"]
  id_loss = torch.stack([F.cross_entropy(logits[r], labels, label_smoothing=loss_config.label_smoothing)
                         for r in range(logits.shape[0])]).mean()
  features, nb = outputs["features"], outputs["num_branches"]
  triplet = torch.stack([batch_hard_triplet(features[g:g + nb].reshape(-1, features.shape[-1]),
                                            labels.repeat(nb), loss_config.triplet_margin)
                         for g in range(0, features.shape[0], nb)]).mean()
  nuances = outputs["nuances"]
  zero = torch.zeros((), dtype=logits.dtype)
  cnm, ortho = zero, zero
  if nuances is not None:
    cnm = sum(center_nuances_mining(outputs["global"], nuances[i], labels, modality, loss_config.cnm_margin)
              for i in range(nuances.shape[0]))
    if nuances.shape[0] >= 2:
      ortho = (nuances[0] * nuances[1]).sum(-1).mean()
  total = (loss_config.id_weight * id_loss + loss_config.triplet_weight * triplet + loss_config.cnm_weight * cnm
           + loss_config.ortho_weight * ortho)
  return total, {"id": id_loss, "triplet": triplet, "cnm": cnm, "ortho": ortho, "total": total}


# --- model from a config, Flax weights, the SGD step -----------------------------------------------------------------

def model_from_config(model_config: Any, num_classes: int) -> TorchFDNM:
  """`TorchFDNM` from `config.model` (float32 only)."""
  if model_config.dtype != "float32":
    raise ValueError(f"model.dtype={model_config.dtype!r}: the torch reference runs float32 only.")
  if model_config.agp_groups < 1:
    raise ValueError(f"model.agp_groups={model_config.agp_groups}: expected >= 1.")
  other = {k: model_config.get(k, v) for k, v in run_config.REFERENCE_READING.items() if model_config.get(k, v) != v}
  if other:
    raise ValueError(f"the torch reference computes the reference reading only ({run_config.REFERENCE_READING}); "
                     f"this config sets {other}.")
  return TorchFDNM(num_classes, model_config.stage_sizes, model_config.width, model_config.last_stride,
                   model_config.agp_stages, model_config.anm_stage, model_config.anm_keep_original,
                   model_config.num_parts)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v, np.float32)
  return out


def flax_to_state_dict(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """A Flax FDNM variable tree {"params", "batch_stats"} -> a `TorchFDNM` state dict (float32 tensors).

  Conv kernels HWIO -> OIHW; Dense kernels [in, out] -> [out, in] (ANM's 1x1 convs get [out, in, 1, 1]);
  AGP's `gate_0..gate_{G-1}` kernels [C, C/G] are concatenated along the outputs into one [C, C] map;
  BatchNorm/InstanceNorm scale -> weight, mean/var -> running_mean/running_var.
  """
  out: dict[str, np.ndarray] = {}
  gates: dict[str, dict[int, np.ndarray]] = {}
  for collection in ("params", "batch_stats"):
    for path, value in _flatten(variables.get(collection, {})).items():
      module, leaf = list(path[:-1]), path[-1]
      if module[0].startswith("agp"):
        gates.setdefault(module[0], {})[int(module[1].split("_")[1])] = value
        continue
      name = ".".join(module)
      if leaf == "kernel":
        if value.ndim == 4:
          value = value.transpose(3, 2, 0, 1)
        else:
          value = value.T
          if module[0] == "anm":
            value = value[:, :, None, None]
        out[f"{name}.weight"] = value
      else:
        out[f"{name}.{ {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[leaf]}"] = (
            value)
  for name, parts in gates.items():
    out[f"{name}.gate.weight"] = np.concatenate([parts[g] for g in sorted(parts)], axis=1).T
  return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in out.items()}


def load_flax_variables(model: TorchFDNM, variables: Mapping[str, Any]) -> None:
  """Copies a Flax FDNM variable tree into `model` (strict: every torch parameter and buffer but the BN counters,
  and the BNNeck's fixed zero bias, must be given)."""
  state = flax_to_state_dict(variables)
  for name, param in model.named_parameters():
    if name.startswith("bnneck") and name.endswith(".bias"):
      state.setdefault(name, torch.zeros_like(param))
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith("num_batches_tracked")]
  if missing or unexpected:
    raise ValueError(f"Flax variables do not fit the torch FDNM: missing {missing}, unexpected {unexpected}")


def make_optimizer(model: TorchFDNM, optim_config: Any) -> torch.optim.SGD:
  """SGD(momentum, nesterov, weight_decay) with the backbone at base_lr and bnneck*/classifier at head_lr
  (the schedule factor is left out: the benchmark times steps, not a schedule)."""
  head, backbone = [], []
  for name, param in model.named_parameters():
    if param.requires_grad:
      (head if name.startswith(("bnneck", "classifier")) else backbone).append(param)
  kwargs = dict(momentum=optim_config.momentum, nesterov=optim_config.nesterov, weight_decay=optim_config.weight_decay)
  return torch.optim.SGD([{"params": backbone, "lr": optim_config.base_lr},
                          {"params": head, "lr": optim_config.head_lr}], **kwargs)


def train_step(model: TorchFDNM, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
               loss_config: Any) -> dict[str, float]:
  """One SGD step on a cross-modality batch (visible/infrared [b, 3, H, W], *_labels [b]); returns the loss terms."""
  model.train()
  labels = torch.cat([batch["visible_labels"], batch["infrared_labels"]])
  modality = torch.cat([torch.zeros_like(batch["visible_labels"]), torch.ones_like(batch["infrared_labels"])])
  outputs = model(batch["visible"], batch["infrared"])
  total, terms = total_loss(outputs, labels, modality, loss_config)
  optimizer.zero_grad(set_to_none=True)
  total.backward()
  optimizer.step()
  return {k: float(v.detach()) for k, v in terms.items()}
