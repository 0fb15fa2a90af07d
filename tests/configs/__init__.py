"""Test configs (tiny.py, tiny_fdnm.py) and `with_overrides`, which sets fields of a config by dotted name."""


def with_overrides(config, overrides):
  """`config` with each {"section.field": value} of `overrides` set (in place; returned)."""
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config
