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
