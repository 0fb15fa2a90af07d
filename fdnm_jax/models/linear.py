"""A matmul over the channel (last) axis whose weight gradient transposes the smaller operand.

`channel_matmul(x, w)` = `x @ w` for x [..., Cin] and w [Cin, Cout]. Its gradients are the usual
dx = dy w^T and dw = X^T dY (X, dY: x and dy flattened to [N, Cin], [N, Cout]); only the way dw is
written differs from JAX's own rule. Every GEMM of XLA's CPU backend takes row-major operands, so
a contraction over N, the leading axis of both, needs one of them transposed in memory. Left to
itself XLA transposed dY inside the fusion that produced it (the BatchNorm backward), a strided
write that took 18 % of the ResNet-50 train step on a 2-core CPU (docs/benchmarks.md). Here the
operand with fewer channels is transposed explicitly, into its own copy: dw = (X^T) dY when
Cin <= Cout, else (dY^T X)^T. Same values up to float rounding (the order of the sums over N is
XLA's either way).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def channel_matmul(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
  """x [..., Cin] @ kernel [Cin, Cout] -> [..., Cout] (one dtype for both; `precision` as in lax.dot_general)."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _forward(x, kernel, precision):
  return channel_matmul(x, kernel, precision), (x, kernel)


def _backward(precision, residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
  flat_x = x.reshape(-1, x.shape[-1])
  flat_dy = dy.reshape(-1, dy.shape[-1])
  if flat_x.shape[1] <= flat_dy.shape[1]:
    dkernel = jnp.matmul(flat_x.T, flat_dy, precision=precision)
  else:
    dkernel = jnp.matmul(flat_dy.T, flat_x, precision=precision).T
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


channel_matmul.defvjp(_forward, _backward)


class ChannelDense(nn.Module):
  """A bias-free `nn.Dense` over the last axis computed by `channel_matmul` (same `kernel` [Cin, features]).

  Attributes:
    features: output channels.
    kernel_init: initialiser of the float32 kernel.
    dtype: compute dtype (inputs and kernel are cast to it).
    precision: matmul precision (lax.Precision), e.g. HIGHEST to keep float32 on accelerators.
  """

  features: int
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  precision: jax.lax.Precision | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps [..., Cin] to [..., features] in `dtype`."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return channel_matmul(x, kernel, self.precision)
