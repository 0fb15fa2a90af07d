"""Two-stream ResNet in the torchvision layout (NHWC, Flax Linen).

The backbone of FDNM (FDNM_SPEC §1.1): a modality-specific stem per modality
(`conv1` 7x7/2 + `bn1` + ReLU + 3x3/2 max-pool with padding 1) followed by shared
Bottleneck stages `layer1..layer4` (expansion 4, stride on the 3x3 conv,
`downsample` 1x1 conv + BN on the first block of a stage whose output shape
differs from its input). `last_stride=1` keeps layer3's spatial size in layer4.

Parameter naming and the torchvision state-dict mapping
-------------------------------------------------------
Modules are named so that a torchvision ResNet state dict maps one-to-one (the
same paths are used by `ResNet` here and at the top level of `FDNM`):

  torchvision key                    Flax path                               note
  conv1.weight                       {visible,infrared}_stem/conv1/kernel   both stems from the same tensor
  bn1.{weight,bias}                  {visible,infrared}_stem/bn1/{scale,bias}
  bn1.{running_mean,running_var}     batch_stats {visible,infrared}_stem/bn1/{mean,var}
  layer{s}.{b}.conv{k}.weight        layer{s}/block{b}/conv{k}/kernel        k = 1, 2, 3
  layer{s}.{b}.bn{k}.*               layer{s}/block{b}/bn{k}/*               as bn1 above
  layer{s}.{b}.downsample.0.weight   layer{s}/block{b}/downsample_conv/kernel
  layer{s}.{b}.downsample.1.*        layer{s}/block{b}/downsample_bn/*
  bn*.num_batches_tracked, fc.*      (dropped)

Conv weights transpose from PyTorch OIHW to Flax HWIO: `kernel = w.transpose(2, 3, 1, 0)`.
Blocks are numbered from 0 as in torchvision (`layer1.0` -> `layer1/block0`).

Init follows torchvision: convs kaiming-normal with fan_out (std sqrt(2 / fan_out)),
BatchNorm scale 1 and bias 0. BatchNorm uses the Flax decay convention
(`bn_momentum=0.9` is PyTorch's momentum 0.1), epsilon 1e-5 and no `axis_name`:
under `jax.jit` with a batch-sharded input its statistics are global over the
batch. Flax updates the running variance with the biased batch variance where
PyTorch uses the unbiased one (a factor n/(n-1) on the running var only).
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdnm_jax.models import linear

Dtype = Any

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

EXPANSION = 4


class Conv1x1(nn.Module):
  """A bias-free 1x1 convolution written as a matmul over the channel axis of NHWC maps.

  Same parameter as `nn.Conv(features, (1, 1))` (`kernel` [1, 1, Cin, features], same init and RNG stream), same
  result up to float rounding; a stride s keeps every s-th row and column (no padding). On the CPU backend XLA
  lowers a dot and its gradients to plain GEMMs, where the convolution's weight gradient needs the activations
  transposed in several layouts; `linear.channel_matmul` transposes only the smaller operand of the weight
  gradient (docs/benchmarks.md), on the CPU only (`linear.cpu_only_rule`; JAX's own rule on other platforms).

  Attributes:
    features: output channels.
    stride: spatial stride.
    dtype: compute dtype; the kernel is float32.
  """

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [B, H, W, Cin] to [B, ceil(H/stride), ceil(W/stride), features] in `dtype`."""
    kernel = self.param("kernel", conv_kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.stride != 1:
      x = x[:, ::self.stride, ::self.stride, :]
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return linear.channel_dense_matmul(x, kernel[0, 0])


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Module:
  if kernel == 1:
    return Conv1x1(features, stride=stride, dtype=dtype, name=name)
  pad = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=conv_kernel_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _batch_norm(train: bool, momentum: float, dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=momentum,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def _pool_windows(x: jax.Array) -> tuple[list[tuple[int, int, jax.Array]], tuple[int, ...]]:
  """The 9 strided [B, out_h, out_w, C] views of the -inf padded x, with their (row, col) offsets."""
  batch, height, width, channels = x.shape
  out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  windows = []
  for dy in range(3):
    for dx in range(3):
      windows.append((dy, dx, jax.lax.slice(padded, (0, dy, dx, 0),
                                            (batch, dy + 2 * out_h - 1, dx + 2 * out_w - 1, channels), (1, 2, 2, 1))))
  return windows, padded.shape


@jax.custom_vjp
def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))` as the maximum of 9 strided slices.

  Same values ([B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C], -inf padding). The gradient of each output goes to
  the first input of its window (row-major order) that equals the maximum, as PyTorch's max_pool2d does; it is
  written as 9 masked strided pads, which XLA fuses into one pass, instead of select-and-scatter (lowered on the
  CPU to an iota + scatter over the whole map) or the gradient of a chain of maximums (8 select passes).
  """
  windows, _ = _pool_windows(x)
  out = windows[0][2]
  for _, _, window in windows[1:]:
    out = jnp.maximum(out, window)
  return out


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  out = max_pool_3x3_stride2(x)
  return out, (x, out)


def _max_pool_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
  x, out = residuals
  windows, padded_shape = _pool_windows(x)
  zero = jnp.zeros((), grad.dtype)
  taken = jnp.zeros(out.shape, bool)
  grad_padded = jnp.zeros(padded_shape, grad.dtype)
  for dy, dx, window in windows:
    hit = (window == out) & ~taken
    taken = taken | hit
    # Strided scatter of this window's share: interior padding 1 puts output (i, j) at (dy + 2i, dx + 2j).
    config = [(0, 0, 0), (dy, padded_shape[1] - dy - (2 * out.shape[1] - 1), 1),
              (dx, padded_shape[2] - dx - (2 * out.shape[2] - 1), 1), (0, 0, 0)]
    grad_padded = grad_padded + jax.lax.pad(jnp.where(hit, grad, zero), zero, config)
  return (grad_padded[:, 1:-1, 1:-1, :],)


max_pool_3x3_stride2.defvjp(_max_pool_forward, _max_pool_backward)


def plain_max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """`max_pool_3x3_stride2` with JAX's own gradient (select-and-scatter: ties go to one maximum per window)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def stem_max_pool(x: jax.Array) -> jax.Array:
  """The stem's 3x3/2 max-pool: the custom gradient of `max_pool_3x3_stride2` where the program is lowered for
  the CPU (where it was measured, docs/benchmarks.md), JAX's `nn.max_pool` elsewhere (`linear.cpu_only_rule`)."""
  return linear.cpu_only_rule(max_pool_3x3_stride2, plain_max_pool_3x3_stride2, x)


class Stem(nn.Module):
  """Modality-specific stem: conv1 7x7/2 -> bn1 -> ReLU -> max-pool 3x3/2 (pad 1).

  Attributes:
    width: output channels (64 for ResNet-50).
    dtype: compute dtype; params are float32.
    bn_momentum: BatchNorm running-average decay (Flax convention).
  """

  width: int = 64
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images [B, H, W, 3] to [B, ceil(H/4), ceil(W/4), width] in `dtype`."""
    x = _conv(self.width, 7, 2, self.dtype, "conv1")(x)
    x = _batch_norm(train, self.bn_momentum, self.dtype, "bn1")(x)
    x = nn.relu(x)
    return stem_max_pool(x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), residual, ReLU.

  Attributes:
    width: bottleneck channels; the block outputs `4 * width`.
    stride: stride of the 3x3 conv (and of the downsample conv).
    dtype: compute dtype.
    bn_momentum: BatchNorm running-average decay (Flax convention).
  """

  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps [B, H, W, Cin] to [B, H/stride, W/stride, 4 * width]."""
    bn = functools.partial(_batch_norm, train, self.bn_momentum, self.dtype)
    out_features = self.width * EXPANSION
    residual = x
    y = nn.relu(bn("bn1")(_conv(self.width, 1, 1, self.dtype, "conv1")(x)))
    y = nn.relu(bn("bn2")(_conv(self.width, 3, self.stride, self.dtype, "conv2")(y)))
    y = bn("bn3")(_conv(out_features, 1, 1, self.dtype, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_features:
      residual = _conv(out_features, 1, self.stride, self.dtype, "downsample_conv")(x)
      residual = bn("downsample_bn")(residual)
    return nn.relu(y + residual)


class Stage(nn.Module):
  """One ResNet stage (`layer{s}`): `num_blocks` Bottlenecks named `block0..`.

  Attributes:
    num_blocks: Bottleneck blocks in the stage.
    width: bottleneck channels; the stage outputs `4 * width`.
    stride: stride of the first block.
    dtype: compute dtype.
    bn_momentum: BatchNorm running-average decay (Flax convention).
  """

  num_blocks: int
  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps [B, H, W, Cin] to [B, H/stride, W/stride, 4 * width]."""
    for b in range(self.num_blocks):
      x = Bottleneck(
          self.width,
          stride=self.stride if b == 0 else 1,
          dtype=self.dtype,
          bn_momentum=self.bn_momentum,
          name=f"block{b}",
      )(x, train=train)
    return x


def stage_strides(num_stages: int, last_stride: int) -> tuple[int, ...]:
  """Strides of layer1..layerN: 1, then 2 for each later stage, `last_stride` for the last."""
  strides = [1] + [2] * (num_stages - 1)
  if num_stages > 1:
    strides[-1] = last_stride
  return tuple(strides)


def make_stem(name: str, width: int, dtype: Dtype, bn_momentum: float) -> Stem:
  """A `Stem` named `name` (`visible_stem` or `infrared_stem`)."""
  return Stem(width=width, dtype=dtype, bn_momentum=bn_momentum, name=name)


def make_stage(index: int, num_blocks: int, width: int, last_stride: int, num_stages: int,
               dtype: Dtype, bn_momentum: float) -> Stage:
  """The stage `layer{index}` (1-based) with torchvision widths and strides."""
  return Stage(
      num_blocks=num_blocks,
      width=width * 2 ** (index - 1),
      stride=stage_strides(num_stages, last_stride)[index - 1],
      dtype=dtype,
      bn_momentum=bn_momentum,
      name=f"layer{index}",
  )


def concat_streams(visible: jax.Array | None, infrared: jax.Array | None, width: int, dtype: Dtype,
                   bn_momentum: float, train: bool) -> jax.Array:
  """Runs each modality through its own stem and concatenates (visible first) along the batch.

  Must be called inside a compact module: creates `visible_stem` / `infrared_stem`
  there (only the stems whose input is given).
  """
  if visible is None and infrared is None:
    raise ValueError("Both `visible` and `infrared` are None: pass at least one image batch.")
  maps = []
  if visible is not None:
    maps.append(make_stem("visible_stem", width, dtype, bn_momentum)(visible, train=train))
  if infrared is not None:
    maps.append(make_stem("infrared_stem", width, dtype, bn_momentum)(infrared, train=train))
  return maps[0] if len(maps) == 1 else jnp.concatenate(maps, axis=0)


class ResNet(nn.Module):
  """Two-stream ResNet backbone (modality stems + shared stages), no head.

  Attributes:
    stage_sizes: Bottleneck blocks per stage ((3, 4, 6, 3) = ResNet-50).
    width: stem channels and first-stage bottleneck width (64 = ResNet-50).
    last_stride: stride of the last stage (1 keeps the previous stage's size).
    dtype: compute dtype; params are float32.
    bn_momentum: BatchNorm running-average decay (Flax convention).
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  last_stride: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, visible: jax.Array | None, infrared: jax.Array | None,
               train: bool = False) -> dict[str, jax.Array]:
    """Returns the feature maps of every stage.

    Args:
      visible: [Bv, H, W, 3] visible images, or None.
      infrared: [Bi, H, W, 3] infrared images, or None (not both None).
      train: batch statistics (True) or running averages (False) in BatchNorm.

    Returns:
      {"stem": [B, H/4, W/4, width], "layer1": ..., "layer{N}": ...} in `dtype`,
      B = Bv + Bi with the visible images first.
    """
    x = concat_streams(visible, infrared, self.width, self.dtype, self.bn_momentum, train)
    maps = {"stem": x}
    for i, num_blocks in enumerate(self.stage_sizes, start=1):
      x = make_stage(i, num_blocks, self.width, self.last_stride, len(self.stage_sizes),
                     self.dtype, self.bn_momentum)(x, train=train)
      maps[f"layer{i}"] = x
    return maps


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width=64)
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
