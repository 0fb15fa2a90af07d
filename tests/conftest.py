"""Test-session set-up: the CPU XLA flags main.py uses, so tests run the train step as users do (and faster).

Set before any test starts a JAX backend; subprocesses inherit them through XLA_FLAGS (those that replace
XLA_FLAGS get them again from main.py).
"""

from fdnm_jax import platform

platform.configure_xla_flags()
