"""The PyTorch reference of the train-step benchmark (benchmarks/torch_fdnm.py) computes what fdnm-jax computes.

The same weights go into both (Flax init -> `load_flax_variables`); the forward outputs in train mode (batch
statistics), the loss terms, the updated BatchNorm statistics and the parameters after one SGD step must agree, so
that the benchmark compares the same work. Tiny model (stage_sizes (1, 1, 1, 1), width 8) on 64 x 32 images.

Well-posed by construction: AGP turns a phase P into P (1 + s), which jumps where P crosses the -pi/pi cut (a
bin X with re < 0 and im ~ 0). A float32 reference there follows its own rounding (the torch float32 run
disagreed with itself across processes, once in about ten, by 6e-4 after one such bin flipped), so the torch side
runs in float64 (the same code, `model.double()`) and the batch is one whose AGP inputs keep every phase-carrying
bin with re < 0 at least `CUT_MARGIN` of the map's RMS amplitude off the real axis (checked on the float64 run
before comparing). fdnm-jax's float32 spectra of these maps are within ~5e-6 of the RMS of the float64 ones (3 sigma
of independent roundings, u = 2^-24: the convs before AGP, the stem's K = 147-term sums and layer1's <= 72, add
~sqrt(K) u each, the FFT ~u log2(N)), so no bin can cross the cut and the outputs are continuous functions of the
rounding. The 1e-4 tolerances (`TOL`): the ~15 convs of the deepest path add ~sqrt(K) u each (K <= 576: 1.4e-6, 1
sigma) of their outputs' scale, ~5.6e-6 over the path in quadrature; ANM's instance norm over 8 bins divides by the
bins' spread, a gain of a few; 1e-4 is 3 sigma with a gain up to ~6 (measured gaps <= 3.1e-5). float64 on the torch
side adds nothing at this scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from benchmarks import torch_fdnm
from fdnm_jax import losses, optim, run_config, train
from fdnm_jax.models import spectral
from fdnm_jax.models.fdnm import fdnm_from_config
from tests.configs import tiny

NUM_CLASSES = 5
# A phase-carrying AGP input bin with re < 0 has |im| >= CUT_MARGIN * the RMS amplitude of its map (module
# docstring): 20x the float32 error (~5e-6 of the RMS, 3 sigma) of fdnm-jax's spectra of these maps.
CUT_MARGIN = 1e-4
# fdnm-jax (float32) against the float64 torch run: outputs, loss terms and updated parameters (module docstring).
TOL = 1e-4
# The batch (`_batch`): a seed whose AGP inputs keep CUT_MARGIN in both variants (found by search over 0-160; most
# seeds have a bin nearer the cut, test_the_batch_keeps_agp_phases_off_the_cut checks this one).
BATCH_SEED = 131


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


def _batch(config, seed: int = BATCH_SEED):
  rng = np.random.default_rng(seed)
  b = config.input.num_ids_per_batch * config.input.num_instances
  shape = (b, config.input.height, config.input.width, 3)
  labels = np.repeat(np.arange(config.input.num_ids_per_batch), config.input.num_instances).astype(np.int32)
  return {"visible": rng.normal(size=shape).astype(np.float32),
          "infrared": rng.normal(size=shape).astype(np.float32),
          "visible_labels": labels, "infrared_labels": labels}


def _torch_batch(batch):
  """NCHW float64 images, int64 labels."""
  return {k: (torch.from_numpy(v.transpose(0, 3, 1, 2).astype(np.float64)) if v.ndim == 4
              else torch.from_numpy(v).long())
          for k, v in batch.items()}


def _float64_torch_model(config, variables) -> torch_fdnm.TorchFDNM:
  tmodel = torch_fdnm.model_from_config(config.model, NUM_CLASSES)
  torch_fdnm.load_flax_variables(tmodel, jax.device_get(variables))
  return tmodel.double()


def cut_margin(maps: np.ndarray) -> float:
  """min |im X| / RMS|X| over the bins of rfft2(maps) (maps [B, C, H, W], NCHW, float64) that carry a phase
  (|X|^2 > 1e-30, not self-conjugate) and have re X < 0: how near AGP's P (1 + s) is to its jump at the cut."""
  spectrum = np.fft.rfft2(maps, axes=(-2, -1), norm="ortho")
  height, width = maps.shape[-2:]
  counted = (np.abs(spectrum) ** 2 > 1e-30) & (spectrum.real < 0)
  for k in spectral.self_conjugate_columns(width):
    counted[:, :, [0, height // 2] if height % 2 == 0 else [0], k] = False
  rms = np.sqrt(np.mean(np.abs(spectrum) ** 2))
  return float(np.min(np.abs(spectrum.imag)[counted]) / rms)


def _forward_recording_agp_inputs(tmodel, config, tbatch) -> tuple[dict, dict[int, np.ndarray]]:
  """(outputs, {stage: the float64 map AGP `stage` took}) of one train-mode forward of `tmodel` on `tbatch`."""
  seen = {}
  hooks = [getattr(tmodel, f"agp{s}").register_forward_pre_hook(
      lambda module, args, s=s: seen.__setitem__(s, args[0].detach().numpy())) for s in config.model.agp_stages]
  tmodel.train()
  try:
    with torch.no_grad():
      outputs = tmodel(tbatch["visible"], tbatch["infrared"])
  finally:
    for hook in hooks:
      hook.remove()
  return outputs, seen


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "parts"])
def test_torch_reference_matches_jax(variant):
  """Forward outputs and loss terms (both variants); parameters after one SGD step (default variant)."""
  config = _config(variant)
  batch = _batch(config)
  model = fdnm_from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, config.schedule, steps_per_epoch=10)
  # Init, forward and loss each as one jitted program, as training runs them (op by op, they cost ~600 small
  # compilations per variant, most of this test's time).
  state = jax.jit(train.create_train_state, static_argnums=(0, 1, 3))(
      model, tx, jax.random.key(0), (1, config.input.height, config.input.width, 3))
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  tmodel = _float64_torch_model(config, variables)
  tbatch = _torch_batch(batch)

  # Forward in train mode and the loss terms.
  labels = np.concatenate([batch["visible_labels"], batch["infrared_labels"]])
  modality = np.repeat([0, 1], len(batch["visible_labels"]))

  @jax.jit
  def forward_and_loss(variables, visible, infrared, labels, modality):
    outputs, _ = model.apply(variables, visible, infrared, train=True, mutable=["batch_stats"])
    return outputs, losses.total_loss(outputs, labels, modality, config.loss)[1]

  outputs, terms = forward_and_loss(variables, batch["visible"], batch["infrared"], labels, modality)
  touts, agp_inputs = _forward_recording_agp_inputs(tmodel, config, tbatch)
  margins = {s: cut_margin(m) for s, m in agp_inputs.items()}
  assert min(margins.values()) >= CUT_MARGIN, f"a bin of an AGP input sits near the phase cut: {margins}"
  with torch.no_grad():
    _, tterms = torch_fdnm.total_loss(touts, torch.from_numpy(labels).long(), torch.from_numpy(modality).long(),
                                      config.loss)
  for key in ("global", "nuances", "features", "logits", "embedding"):
    np.testing.assert_allclose(np.asarray(outputs[key]), touts[key].numpy(), atol=TOL, rtol=TOL, err_msg=key)
  assert float(tterms["cnm"]) > 0 and float(tterms["triplet"]) > 0  # the comparison is not of zeros
  for key in ("id", "triplet", "cnm", "ortho", "total"):
    np.testing.assert_allclose(float(terms[key]), float(tterms[key]), atol=TOL, rtol=TOL, err_msg=key)

  if variant != "default":
    return  # one train-step compilation is enough for the test budget
  # One SGD step each from the same weights: parameters and BN statistics after the step.
  step = jax.jit(train.make_train_step(model, tx, config.loss))
  new_state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  tmodel2 = _float64_torch_model(config, variables)
  tmetrics = torch_fdnm.train_step(tmodel2, torch_fdnm.make_optimizer(tmodel2, config.optim), tbatch, config.loss)
  np.testing.assert_allclose(float(metrics["total"]), tmetrics["total"], atol=TOL, rtol=TOL)
  expected = torch_fdnm.flax_to_state_dict(jax.device_get({"params": new_state.params,
                                                           "batch_stats": new_state.batch_stats}))
  got = tmodel2.state_dict()
  initial = torch_fdnm.flax_to_state_dict(jax.device_get(variables))
  moved = 0
  for name, value in expected.items():
    before = initial[name]
    if name.endswith("running_var"):
      continue  # Flax updates it with the biased batch variance, PyTorch with the unbiased one (resnet.py).
    np.testing.assert_allclose(got[name].numpy(), value.numpy(), atol=TOL, rtol=TOL, err_msg=name)
    moved += int(not np.allclose(value.numpy(), before.numpy()))
  assert moved > len(expected) // 2  # the step changed most tensors, and both sides the same way


def test_cut_margin_by_hand():
  """x[0, 0] = -1, x[0, 1] = e on a 2 x 4 map: the non-self-conjugate bins (u, 1) are (-1 - i e) / sqrt(8), RMS
  amplitude sqrt((1 + e^2) / 8), so the margin is e / sqrt(1 + e^2); a lone -1 puts every bin on the cut."""
  maps = np.zeros((1, 1, 2, 4))
  maps[0, 0, 0, 0] = -1.0
  assert cut_margin(maps) == 0.0
  e = 0.01
  maps[0, 0, 0, 1] = e
  np.testing.assert_allclose(cut_margin(maps), e / np.sqrt(1 + e * e), rtol=1e-12)  # float64 FFT of 8 points.


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
