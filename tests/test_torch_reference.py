"""The PyTorch reference of the train-step benchmark (benchmarks/torch_fdnm.py) computes what fdnm-jax computes.

The same weights go into both (Flax init -> `load_flax_variables`); the forward outputs in train mode (batch
statistics), the loss terms, the updated BatchNorm statistics and the parameters after one SGD step must agree, so
that the benchmark compares the same work. Tiny model (stage_sizes (1, 1, 1, 1), width 8) on 64 x 32 images.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from benchmarks import torch_fdnm
from fdnm_jax import losses, optim, run_config, train
from fdnm_jax.models.fdnm import fdnm_from_config
from tests.configs import tiny

NUM_CLASSES = 5


def _config(variant: str):
  config = tiny.get_config()
  config.schedule.warmup_epochs = 0  # lr factor 1 at step 0, as the torch step (no schedule)
  config.schedule.decay_epochs = ()
  config.loss.ortho_weight = 0.01
  config.model.update(run_config.REFERENCE_READING)  # what the PyTorch reference computes.
  # 64 x 32 images: layer4 maps of 4 x 2 (at 32 x 16 ANM's instance norm sees 2 x 1 bins, whose near-zero
  # variance amplifies float32 rounding past 1e-4).
  config.input.height, config.input.width = 64, 32
  if variant == "parts":  # DEEN-style ANM after layer3, original kept, two stripes
    config.model.anm_stage = 3
    config.model.anm_keep_original = True
    config.model.num_parts = 2
    config.model.agp_stages = (2,)
  return config


def _batch(config):
  rng = np.random.default_rng(0)
  b = config.input.num_ids_per_batch * config.input.num_instances
  shape = (b, config.input.height, config.input.width, 3)
  labels = np.repeat(np.arange(config.input.num_ids_per_batch), config.input.num_instances).astype(np.int32)
  return {"visible": rng.normal(size=shape).astype(np.float32),
          "infrared": rng.normal(size=shape).astype(np.float32),
          "visible_labels": labels, "infrared_labels": labels}


def _torch_batch(batch):
  return {k: (torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) if v.ndim == 4 else torch.from_numpy(v).long())
          for k, v in batch.items()}


@pytest.mark.parametrize("variant", ["default", "parts"])
def test_torch_reference_matches_jax(variant):
  """Forward outputs and loss terms (both variants); parameters after one SGD step (default variant)."""
  config = _config(variant)
  batch = _batch(config)
  model = fdnm_from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, config.schedule, steps_per_epoch=10)
  state = train.create_train_state(model, tx, jax.random.key(0), (1, config.input.height, config.input.width, 3))
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  tmodel = torch_fdnm.model_from_config(config.model, NUM_CLASSES)
  torch_fdnm.load_flax_variables(tmodel, jax.device_get(variables))
  tbatch = _torch_batch(batch)

  # Forward in train mode and the loss terms.
  outputs, _ = model.apply(variables, batch["visible"], batch["infrared"], train=True, mutable=["batch_stats"])
  labels = np.concatenate([batch["visible_labels"], batch["infrared_labels"]])
  modality = np.repeat([0, 1], len(batch["visible_labels"]))
  _, terms = losses.total_loss(outputs, jnp.asarray(labels), jnp.asarray(modality), config.loss)
  tmodel.train()
  with torch.no_grad():
    touts = tmodel(tbatch["visible"], tbatch["infrared"])
    _, tterms = torch_fdnm.total_loss(touts, torch.from_numpy(labels).long(), torch.from_numpy(modality).long(),
                                      config.loss)
  for key in ("global", "nuances", "features", "logits", "embedding"):
    np.testing.assert_allclose(np.asarray(outputs[key]), touts[key].numpy(), atol=1e-4, rtol=1e-4, err_msg=key)
  assert float(tterms["cnm"]) > 0 and float(tterms["triplet"]) > 0  # the comparison is not of zeros
  for key in ("id", "triplet", "cnm", "ortho", "total"):
    np.testing.assert_allclose(float(terms[key]), float(tterms[key]), atol=1e-4, rtol=1e-4, err_msg=key)

  if variant != "default":
    return  # one train-step compilation is enough for the test budget
  # One SGD step each from the same weights: parameters and BN statistics after the step.
  step = jax.jit(train.make_train_step(model, tx, config.loss))
  new_state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  tmodel2 = torch_fdnm.model_from_config(config.model, NUM_CLASSES)
  torch_fdnm.load_flax_variables(tmodel2, jax.device_get(variables))
  tmetrics = torch_fdnm.train_step(tmodel2, torch_fdnm.make_optimizer(tmodel2, config.optim), tbatch, config.loss)
  np.testing.assert_allclose(float(metrics["total"]), tmetrics["total"], atol=1e-4, rtol=1e-4)
  expected = torch_fdnm.flax_to_state_dict(jax.device_get({"params": new_state.params,
                                                           "batch_stats": new_state.batch_stats}))
  got = tmodel2.state_dict()
  initial = torch_fdnm.flax_to_state_dict(jax.device_get(variables))
  moved = 0
  for name, value in expected.items():
    before = initial[name]
    if name.endswith("running_var"):
      continue  # Flax updates it with the biased batch variance, PyTorch with the unbiased one (resnet.py).
    np.testing.assert_allclose(got[name].numpy(), value.numpy(), atol=1e-4, rtol=1e-4, err_msg=name)
    moved += int(not np.allclose(value.numpy(), before.numpy()))
  assert moved > len(expected) // 2  # the step changed most tensors, and both sides the same way


def test_flax_to_state_dict_layouts():
  """Hand-checked layouts: conv HWIO -> OIHW, Dense [in, out] -> [out, in], AGP groups concatenated by output."""
  conv = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # H, W, I, O
  g0 = np.arange(8, dtype=np.float32).reshape(4, 2)
  g1 = 100 + np.arange(8, dtype=np.float32).reshape(4, 2)
  flat = {("params", "layer1", "block0", "conv2", "kernel"): conv,
          ("params", "agp1", "gate_0", "kernel"): g0, ("params", "agp1", "gate_1", "kernel"): g1,
          ("params", "anm", "conv1", "kernel"): g0,
          ("params", "bnneck", "scale"): np.ones(3, np.float32),
          ("batch_stats", "bnneck", "var"): np.full(3, 2.0, np.float32)}
  sd = torch_fdnm.flax_to_state_dict(traverse_util.unflatten_dict(flat))
  assert sd["layer1.block0.conv2.weight"].shape == (5, 4, 2, 3)
  assert float(sd["layer1.block0.conv2.weight"][4, 3, 1, 2]) == conv[1, 2, 3, 4]
  gate = sd["agp1.gate.weight"].numpy()  # torch Linear: out = W @ a, W [out, in]
  assert gate.shape == (4, 4)
  assert gate[3, 1] == g1[1, 1] and gate[0, 2] == g0[2, 0]
  assert sd["anm.conv1.weight"].shape == (2, 4, 1, 1) and float(sd["anm.conv1.weight"][1, 3, 0, 0]) == g0[3, 1]
  assert float(sd["bnneck.running_var"][0]) == 2.0 and float(sd["bnneck.weight"][2]) == 1.0
