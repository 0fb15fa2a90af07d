"""fdnm_jax/platform.py: CPU XLA flags are added only on the CPU and never override the user's XLA_FLAGS."""

import pytest

from fdnm_jax import platform

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.fixture(name="fresh_backend")
def _fresh_backend(monkeypatch):
  monkeypatch.setattr(platform, "_backend_started", lambda: False)


def test_adds_the_cpu_flags_after_the_users_own(fresh_backend):
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert platform.configure_xla_flags(env) == [FLAG]
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + FLAG
  assert platform.configure_xla_flags(env) == []  # idempotent
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_never_overrides_a_user_flag_of_the_same_name(fresh_backend):
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=default"}
  assert platform.configure_xla_flags(env) == []
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=default"


@pytest.mark.parametrize("platforms", ["cuda", "tpu", "cuda,cpu"])
def test_nothing_for_accelerators(fresh_backend, platforms):
  env = {"JAX_PLATFORMS": platforms}
  assert platform.configure_xla_flags(env) == []
  assert "XLA_FLAGS" not in env


def test_unset_platforms_follow_the_installed_plugins(fresh_backend, monkeypatch):
  monkeypatch.setattr(platform, "_accelerator_installed", lambda: True)
  assert platform.configure_xla_flags({}) == []
  monkeypatch.setattr(platform, "_accelerator_installed", lambda: False)
  env = {}
  assert platform.configure_xla_flags(env) == [FLAG] and env["XLA_FLAGS"] == FLAG


def test_too_late_once_a_backend_started(monkeypatch):
  monkeypatch.setattr(platform, "_backend_started", lambda: True)
  env = {"JAX_PLATFORMS": "cpu"}
  assert platform.configure_xla_flags(env) == []
  assert "XLA_FLAGS" not in env


# --- the init program's compiler options ---

def test_init_compiles_at_level_2_on_the_cpu_only():
  assert platform.init_compiler_options("cpu", {}, cheap_mode=False) == {"xla_backend_optimization_level": 2}
  assert platform.init_compiler_options("gpu", {}, cheap_mode=False) is None
  assert platform.init_compiler_options("tpu", {}, cheap_mode=False) is None
  assert platform.init_compiler_options("cpu", {}, cheap_mode=True) is None  # level 0 already.
  user = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_backend_optimization_level=3"}
  assert platform.init_compiler_options("cpu", user, cheap_mode=False) is None


def test_init_options_keep_the_initialisers_values():
  """A Flax model's initialisers (truncated-normal and normal kernels, zeros, ones) compiled with the init options
  and with XLA's defaults (level 3, expensive LLVM passes on) draw the same parameters: the options are accepted by
  the CPU compiler and change no maths. Bound: 4 float32 ulps (a contracted multiply-add in the samplers' erf_inv
  polynomial moves a value by 1-2 ulps); a changed random stream or a dropped initialiser is O(1)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"))(x)
      x = nn.BatchNorm(use_running_average=False)(x)
      return nn.Dense(5, kernel_init=nn.initializers.normal(0.001))(x.mean((1, 2)))

  def init(rng):
    return Small().init(rng, jax.numpy.zeros((1, 8, 4, 3)))

  rng = jax.random.key(3)
  default = jax.jit(init).lower(rng).compile(
      compiler_options={"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False})(rng)
  level2 = jax.jit(init).lower(rng).compile(compiler_options=platform.INIT_COMPILER_OPTIONS)(rng)
  leaves, leaves2 = jax.tree.leaves(default), jax.tree.leaves(level2)
  assert len(leaves) == len(leaves2) == 8  # BN mean, var, bias, scale; Conv and Dense kernel, bias.
  for a, b in zip(leaves, leaves2):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=4 * np.finfo(np.float32).eps, atol=0)
  assert np.std(np.asarray(default["params"]["Conv_0"]["kernel"])) > 0.1  # drawn, not zeros.
