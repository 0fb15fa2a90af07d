"""Shared fixtures: one tiny synthetic data set (RegDB layout) per test session, and a tiny input config."""

import pytest

from configs import default
from input_pipeline.datasets import regdb, synthetic

TINY = dict(num_train_ids=8, num_test_ids=4, images_per_id=4, num_cameras=2, height=32, width=16, seed=0)


@pytest.fixture(scope="session")
def tiny_params() -> dict:
  """The generator arguments of `tiny_root`."""
  return dict(TINY)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
  """A generated 8 + 4 identity set, 4 images per identity and modality, 32 x 16 pixels."""
  return synthetic.generate(str(tmp_path_factory.mktemp("data") / "synthetic"), **TINY)


@pytest.fixture(scope="session")
def tiny_sets(tiny_root):
  return regdb.read_regdb(tiny_root, 1)


@pytest.fixture
def input_config():
  """config.input at the stored size (32 x 16), P = 4, K = 2, every augmentation on."""
  c = default.get_config().input
  c.height, c.width = 32, 16
  c.pad = 2
  c.num_ids_per_batch = 4
  c.num_instances = 2
  c.channel_aug = True
  c.eval_batch_size = 8
  c.prefetch = 1
  return c
