"""Tests of channel_matmul / ChannelDense (fdnm_jax/models/linear.py) against NumPy float64 gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax.models import linear


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
  np.testing.assert_allclose(value, np.sum(w64 * (x64 @ k64)), rtol=1e-5)
  # d/dx sum(w * (x K)) = w K^T; d/dK = sum over positions of x^T w.
  np.testing.assert_allclose(dx, w64 @ k64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dkernel, x64.reshape(-1, cin).T @ w64.reshape(-1, cout), rtol=1e-5, atol=1e-5)
  assert dx.dtype == jnp.float32 and dkernel.shape == (cin, cout)


def test_channel_dense_matches_flax_dense_parameters_and_outputs():
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  ours = linear.ChannelDense(3, kernel_init=jax.nn.initializers.normal(1.0))
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (7, 3)}}
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  np.testing.assert_allclose(ours.apply(variables, x), x.astype(np.float64) @ kernel, rtol=1e-5, atol=1e-6)
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
  np.testing.assert_allclose(grads["params"]["kernel"], np.full((8, 2), 4.0))  # sum over 4 rows of ones
