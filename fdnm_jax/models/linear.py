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

The rule was measured on the CPU backend only, so `channel_dense_matmul` (and resnet's max-pool) use it only
when the program is lowered for the CPU: `cpu_only_rule` picks the branch with `jax.lax.platform_dependent`,
i.e. by the platform the computation is compiled for (not the process's default backend), and XLA drops the
other branch at compile time. `gradient_rule("custom" | "plain")` forces one branch while tracing (tests run
the off-CPU path on the CPU with it).
"""

import contextlib

import functools
from collections.abc import Callable
from typing import Any

from collections.abc import Iterator

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

GRADIENT_RULES = ("auto", "custom", "plain")
_forced_rule = "auto"


@contextlib.contextmanager
def gradient_rule(rule: str) -> Iterator[None]:
  """While tracing inside the block, `cpu_only_rule` takes the `rule` branch: "custom" (the CPU-tuned custom
  gradients), "plain" (JAX's own rules, what other backends get) or "auto" (by the lowering platform)."""
  global _forced_rule
  if rule not in GRADIENT_RULES:
    raise ValueError(f"gradient rule {rule!r}: expected one of {GRADIENT_RULES}.")
  previous, _forced_rule = _forced_rule, rule
  try:
    yield
  finally:
    _forced_rule = previous


def cpu_only_rule(custom_fn: Callable[..., Any], plain_fn: Callable[..., Any], *args: Any) -> Any:
  """custom_fn(*args) where the program is lowered for the CPU, plain_fn(*args) on every other platform.

  The two functions must compute the same values (they differ only in how their gradients are written).
  `gradient_rule` overrides the choice while tracing.
  """
  if _forced_rule == "custom":
    return custom_fn(*args)
  if _forced_rule == "plain":
    return plain_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=custom_fn, default=plain_fn)


def plain_matmul(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
  """`channel_matmul` with JAX's own gradient rule."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def channel_dense_matmul(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
  """x [..., Cin] @ kernel [Cin, Cout]: `channel_matmul`'s custom gradient on the CPU, JAX's rule elsewhere."""
  return cpu_only_rule(lambda a, b: channel_matmul(a, b, precision), lambda a, b: plain_matmul(a, b, precision),
                       x, kernel)


class ChannelDense(nn.Module):
  """A bias-free `nn.Dense` over the last axis computed by `channel_dense_matmul` (same `kernel` [Cin, features]).

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
    return channel_dense_matmul(x, kernel, self.precision)
