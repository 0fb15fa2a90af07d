"""Mesh construction from the config and host-to-global batches (on one CPU device here; the
8-device case runs in tests/test_train.py in a subprocess)."""

import jax
import ml_collections
import numpy as np
import pytest

from fdnm_jax import sharding


def _mesh_config(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def test_make_mesh_takes_all_devices_with_minus_one():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("data, fsdp", [(2, 1), (0, 1), (-1, 0), (-1, 3)])
def test_make_mesh_rejects_impossible_sizes(data, fsdp):
  devices = jax.devices()[:1]  # one device: none of these sizes fits it.
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(_mesh_config(data, fsdp), devices=devices)


def test_host_to_global_keeps_values():
  mesh = sharding.make_mesh(_mesh_config(-1, 1))
  batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "y": np.arange(4, dtype=np.int32)}
  g = sharding.host_to_global(batch, mesh)
  np.testing.assert_array_equal(np.asarray(g["x"]), batch["x"])
  np.testing.assert_array_equal(np.asarray(g["y"]), batch["y"])
  assert g["x"].sharding == sharding.batch_sharding(mesh)
