"""Tests of channel_matmul / ChannelDense (fdnm_jax/models/linear.py) against NumPy float64 gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax.models import linear
from tests.rounding import U, dot_bound


@pytest.mark.parametrize("cin,cout", [(3, 5), (6, 2), (4, 4)])  # both branches of the weight gradient
def test_channel_matmul_value_and_gradients_match_numpy(cin, cout):
  rng = np.random.default_rng(cin * 10 + cout)
  x = rng.normal(size=(2, 3, 4, cin)).astype(np.float32)
  kernel = rng.normal(size=(cin, cout)).astype(np.float32)
  weights = rng.normal(size=(2, 3, 4, cout)).astype(np.float32)  # loss = sum(weights * y)

  def loss(x, kernel):
    return jnp.sum(jnp.asarray(weights) * linear.channel_matmul(x, kernel))

  value, (dx, dkernel) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)
  x64, k64, w64 = (a.astype(np.float64) for a in (x, kernel, weights))
  # Worst-case float32 bounds (`dot_bound`). value: Cin-term products x K, then the sum of the 24 Cout terms
  # w y; first order gamma_Cin + gamma_(24 Cout) of sum |w| (|x| |K|). These random-sign sums cancel (|value| is
  # 1/5 to 1/11 of that sum of magnitudes), so the bound is up to 8.5e-5 relative: above a fixed rtol of 1e-5.
  positions = x.size // cin
  value_bound = (cin + positions * cout + 2) * U * np.sum(np.abs(w64) * (np.abs(x64) @ np.abs(k64)))
  np.testing.assert_allclose(value, np.sum(w64 * (x64 @ k64)), rtol=0, atol=value_bound)
  # d/dx sum(w * (x K)) = w K^T: Cout-term dot products, within 3.1e-6 (`dot_bound`, largest case); this
  # tolerance is >= 4.9x the bound everywhere.
  np.testing.assert_allclose(dx, w64 @ k64.T, rtol=1e-5, atol=1e-5)
  # d/dK = sum over the 24 positions of x^T w: 24-term dot products, each within `dot_bound` (up to 4.1e-5,
  # above a fixed 1e-5 + 1e-5 |dK| for the smaller entries).
  x_flat, w_flat = x64.reshape(-1, cin), w64.reshape(-1, cout)
  np.testing.assert_array_less(np.abs(dkernel - x_flat.T @ w_flat), dot_bound(positions, x_flat.T, w_flat))
  assert dx.dtype == jnp.float32 and dkernel.shape == (cin, cout)


def test_channel_dense_matches_flax_dense_parameters_and_outputs():
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  ours = linear.ChannelDense(3, kernel_init=jax.nn.initializers.normal(1.0))
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (7, 3)}}
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  got = np.asarray(ours.apply(variables, x), np.float64)
  # 7-term float32 dot products, each within `dot_bound` (up to 3e-6: above 1e-6 + 1e-5 |y| for small |y|).
  np.testing.assert_array_less(np.abs(got - x @ kernel), dot_bound(7, x, kernel))
  # Same initialiser stream as nn.Dense: a checkpoint's "kernel" means the same thing.
  flax_dense = nn.Dense(3, use_bias=False, kernel_init=jax.nn.initializers.normal(1.0))
  np.testing.assert_array_equal(kernel, flax_dense.init(jax.random.key(0), x)["params"]["kernel"])


def test_bfloat16_compute_keeps_float32_kernel_gradient():
  x = jnp.ones((4, 8), jnp.bfloat16)
  layer = linear.ChannelDense(2, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)
  assert layer.apply(variables, x).dtype == jnp.bfloat16
  grads = jax.grad(lambda v: jnp.sum(layer.apply(v, x).astype(jnp.float32)))(variables)
  assert grads["params"]["kernel"].dtype == jnp.float32
  # A sum over 4 rows of ones: 4 is exact in bfloat16 and float32.
  np.testing.assert_array_equal(grads["params"]["kernel"], np.full((8, 2), 4.0))
