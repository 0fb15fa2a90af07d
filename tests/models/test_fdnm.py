"""Tests of the FDNM assembly and head (fdnm_jax/models/fdnm.py) on the tiny model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fdnm_jax.models import FDNM
from fdnm_jax.models import fdnm
from fdnm_jax.models import frequency
from fdnm_jax.models import fdnm_from_config
from tests.rounding import U, dot_bound

NUM_CLASSES = 5
BV, BI, H, W = 2, 3, 64, 32  # tiny maps: layer1 16x8x32 ... layer4 4x2x256
D = 256

COMBOS = {
    "plain": dict(),
    "agp12": dict(agp_stages=(1, 2)),
    "anm4": dict(anm_stage=4),
    "anm3_keep": dict(anm_stage=3, anm_keep_original=True),
    "parts2": dict(num_parts=2),
}
# (branches, nuances) per combo.
BRANCHES = {"plain": (1, 0), "agp12": (1, 0), "anm4": (2, 2), "anm3_keep": (3, 2), "parts2": (1, 0)}


def _tiny(**kwargs):
  return FDNM(num_classes=NUM_CLASSES, stage_sizes=(1, 1, 1, 1), width=8, **kwargs)


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(BV, H, W, 3)).astype(np.float32), rng.normal(size=(BI, H, W, 3)).astype(np.float32))


def _random_variables(model, visible, infrared, seed=0):
  """Variables with init's tree, filled from NumPy (fan-in scaled kernels): avoids compiling init."""
  shapes = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), visible, infrared)
  shapes = {k: shapes[k] for k in ("params", "batch_stats")}  # init also returns what AGP sows ("diagnostics").
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


_apply_train = jax.jit(lambda model, var, v, i: model.apply(var, v, i, train=True, mutable=["batch_stats"]),
                       static_argnums=0)
_apply_eval = jax.jit(lambda model, var, v, i: model.apply(var, v, i, train=False), static_argnums=0)


@pytest.fixture(scope="module", params=list(COMBOS))
def combo(request):
  model = _tiny(**COMBOS[request.param])
  visible, infrared = _images()
  variables = _random_variables(model, visible, infrared)
  out, updated = _apply_train(model, variables, visible, infrared)
  return request.param, model, variables, out, updated


def test_train_outputs(combo):
  name, model, variables, out, updated = combo
  nb, nn_ = BRANCHES[name]
  parts = model.num_parts
  r = nb * (1 + parts)
  b = BV + BI
  expected = {"global": (b, D), "cnm_original": (b, D), "nuances": (nn_, b, D), "features": (r, b, D),
              "part_features": (parts, nb, b, D), "logits": (r, b, NUM_CLASSES), "embedding": (b, r * D)}
  assert {k: v.shape for k, v in out.items()} == expected
  for v in out.values():
    assert v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v)))
  changed = jax.tree.map(lambda a, c: not np.allclose(a, c), variables["batch_stats"], updated["batch_stats"])
  assert all(jax.tree.leaves(changed))
  out = jax.device_get(out)  # NumPy copies: each eager slice of a jax array below would compile a program.
  np.testing.assert_array_equal(out["cnm_original"], out["global"])  # cnm_original="raw": the pooled original.
  if name == "anm3_keep":
    np.testing.assert_array_equal(out["global"], out["features"][0])  # the original branch
  if name == "parts2":  # H = 4 rows: two equal stripes average to the global feature
    # float32 means of non-negative (post-ReLU) values: the global's 8-term sum within 7 u of the feature, each
    # stripe's 4-term sum within 3 u, their mean one rounding: 11 u of the largest feature.
    np.testing.assert_allclose(out["features"][0], out["part_features"].mean(axis=0)[0], rtol=0,
                               atol=11 * U * np.abs(out["features"][0]).max())
    np.testing.assert_array_equal(out["features"][1:], out["part_features"][:, 0])


def _bnneck_error(group, scale):
  """Worst-case float32 error of a train-mode BNNeck on exact float32 features `group` [nb, B, D] (float64).

  Flax's BatchNorm (use_fast_variance): mean over the n = nb B rows within n u of mean |x|; var = E[x^2] - mean^2,
  E[x^2] within (n + 1) u of itself, mean^2 within 2 |mean| d_mean + u, the difference one more rounding (this
  cancellation is what makes var's error large); rsqrt(var + eps) then moves by d_var / (2 (var + eps)) relative,
  and (x - mean) * (rsqrt(.) * scale) rounds 4 more times (rsqrt's 2 ulps included).
  """
  n = group.shape[0] * group.shape[1]
  mean, var = group.mean(axis=(0, 1)), group.var(axis=(0, 1))
  d_mean = n * U * np.abs(group).mean(axis=(0, 1))
  d_var = (n + 1) * U * (group ** 2).mean(axis=(0, 1)) + 2 * np.abs(mean) * d_mean + U * (mean ** 2 + var)
  gain = np.abs(scale) / np.sqrt(var + 1e-5)
  return gain * (d_mean + np.abs(group - mean) * (4 * U + d_var / (2 * (var + 1e-5))))


def test_head_matches_numpy(combo):
  """BNNeck (batch statistics over each entry group's branches) -> classifier, and the embedding."""
  _, model, variables, out, _ = combo
  p = variables["params"]
  features = np.asarray(out["features"], np.float64)
  nb = features.shape[0] // (1 + model.num_parts)
  bn, bn_error = [], []
  for g, name in enumerate(["bnneck"] + [f"bnneck_part{j}" for j in range(model.num_parts)]):
    group = features[g * nb:(g + 1) * nb]
    mean, var = group.mean(axis=(0, 1)), group.var(axis=(0, 1))
    scale = np.asarray(p[name]["scale"], np.float64)
    bn.extend((group - mean) / np.sqrt(var + 1e-5) * scale)
    bn_error.extend(_bnneck_error(group, scale))
  bn, bn_error = np.stack(bn), np.stack(bn_error)
  assert "bias" not in p["bnneck"]
  # Worst-case float32 error per logit: the BNNeck's (`_bnneck_error`) through |kernel|, and the D = 256-term
  # dot product's own gamma_(D+1) of |bn| @ |kernel| (up to 4e-4 here, above a fixed 1e-4).
  kernel = np.asarray(p["classifier"]["kernel"], np.float64)
  logits_error = bn_error @ np.abs(kernel) + dot_bound(D, bn, kernel)
  np.testing.assert_array_less(np.abs(out["logits"] - bn @ kernel), logits_error)
  # The embedding n / |n| per entry: the BNNeck's error e moves it by <= e / |n| + |n_i| |e| / |n|^2, and the
  # normalisation rounds (sum of D squares, sqrt, division) by <= (D / 2 + 2) u relative; the largest of these
  # per-element bounds (1.9e-6 .. 2.1e-5 over the combos) bounds every element.
  norm = np.linalg.norm(bn, axis=-1, keepdims=True)
  normed = bn / norm
  embedding_error = (bn_error + np.abs(normed) * np.linalg.norm(bn_error, axis=-1, keepdims=True)) / norm
  embedding_error += (D / 2 + 2) * U * np.abs(normed)
  np.testing.assert_allclose(out["embedding"], np.concatenate(list(normed), axis=-1), rtol=0,
                             atol=embedding_error.max())


def test_eval_single_modality_and_modality_specific_stems():
  model = _tiny(**COMBOS["anm3_keep"], agp_stages=(1,))
  visible, infrared = _images(1)
  variables = _random_variables(model, visible, infrared, seed=1)
  # NumPy copies (jax.device_get): each eager slice of a jax array below would compile a program.
  joint = jax.device_get(_apply_eval(model, variables, visible, infrared))
  vis_only = jax.device_get(_apply_eval(model, variables, visible, None))
  ir_only = jax.device_get(_apply_eval(model, variables, None, infrared))
  # Each sample goes through the same float32 ops in both programs (eval: running statistics), compiled for other
  # batch sizes, so XLA may block, reassociate and contract them differently. AGP's cut and noise-bin phases leave
  # no worst-case bound; the error model: along each output's ~30 roundings (stem, 4 bottlenecks, AGP, ANM, pooling,
  # BNNeck, classifier), each within ~u of the normalised layer's scale (ANM's 4 x 2 amplitude grid keeps its
  # instance norm's variance above eps, so no 1/sqrt(eps) gain, test_embedding.py), two programs within 64 u of
  # each output's scale (measured 3-4 u).
  for key in ("global", "embedding"):
    np.testing.assert_allclose(vis_only[key], joint[key][:BV], atol=64 * U * np.abs(joint[key]).max())
    np.testing.assert_allclose(ir_only[key], joint[key][BV:], atol=64 * U * np.abs(joint[key]).max())
  np.testing.assert_allclose(ir_only["logits"], joint["logits"][:, BV:], atol=64 * U * np.abs(joint["logits"]).max())
  np.testing.assert_allclose(vis_only["nuances"], joint["nuances"][:, :BV],
                             atol=64 * U * np.abs(joint["nuances"]).max())

  params = dict(variables["params"])
  params["infrared_stem"] = jax.tree.map(lambda a: a * 1.5, params["infrared_stem"])
  moved = jax.device_get(_apply_eval(model, {**variables, "params": params}, visible, infrared))
  for key in ("global", "embedding"):
    np.testing.assert_array_equal(moved[key][:BV], joint[key][:BV])
    assert not np.allclose(moved[key][BV:], joint[key][BV:])


def test_param_tree_and_head_init():
  model = _tiny(agp_stages=(1, 2), anm_stage=4, num_parts=2)
  visible, infrared = _images()
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), visible, infrared)
  p = variables["params"]
  assert set(p) == {"visible_stem", "infrared_stem", "layer1", "layer2", "layer3", "layer4", "agp1", "agp2", "anm",
                    "bnneck", "bnneck_part0", "bnneck_part1", "classifier"}
  assert set(p["agp1"]) == {"gate_0", "gate_1", "gate_2", "gate_3"} and p["agp1"]["gate_0"]["kernel"].shape == (32, 8)
  assert set(p["bnneck"]) == {"scale"}
  assert p["classifier"]["kernel"].shape == (D, NUM_CLASSES)
  scale = np.asarray(jax.jit(lambda: fdnm.bnneck_scale_init(jax.random.key(0), (20000,)))())  # one program
  # N(1, 0.02), N = 20,000: the mean's standard error is 0.02 / sqrt(N) = 1.4e-4 (0.001 is 7 sigma), the std's
  # 0.02 / sqrt(2 N) = 1e-4 (10 sigma); float32 rounding of 1 + 0.02 z is 6e-8.
  assert abs(scale.mean() - 1.0) < 0.001 and abs(scale.std() - 0.02) < 0.001


def test_stripe_bounds_match_adaptive_pooling():
  assert fdnm.stripe_bounds(4, 2) == [(0, 2), (2, 4)]
  assert fdnm.stripe_bounds(9, 2) == [(0, 5), (4, 9)]
  assert fdnm.stripe_bounds(24, 6) == [(4 * j, 4 * j + 4) for j in range(6)]
  assert fdnm.stripe_bounds(5, 3) == [(0, 2), (1, 4), (3, 5)]


def test_from_config_default_is_full_fdnm():
  config = default.get_config()
  model = fdnm_from_config(config.model, num_classes=395)
  assert (model.stage_sizes, model.width, model.last_stride, model.dtype) == ((3, 4, 6, 3), 64, 1, jnp.float32)
  assert (model.agp_stages, model.agp_groups, model.anm_stage, model.anm_keep_original) == ((1, 2), 4, 4, False)
  image = jax.ShapeDtypeStruct((4, 288, 144, 3), jnp.float32)
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), image, image)
  out = jax.eval_shape(lambda var, v: model.apply(var, v, None), variables, image)
  assert out["embedding"].shape == (4, 4096)
  assert out["nuances"].shape == (2, 4, 2048)
  config.model.dtype = "bfloat16"
  assert fdnm_from_config(config.model, 10).dtype == jnp.bfloat16


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float8", "model.dtype"),
    ("anm_stage", 5, "model.anm_stage"),
    ("agp_stages", (0, 1), "model.agp_stages"),
    ("anm_keep_original", True, "model.anm_keep_original"),
])
def test_from_config_rejects_bad_fields(field, value, message):
  config = default.get_config()
  config.model.anm_stage = 0
  config.model[field] = value
  with pytest.raises(ValueError, match=message):
    fdnm_from_config(config.model, 10)


def test_no_input_raises():
  with pytest.raises(ValueError, match="at least one"):
    jax.eval_shape(lambda: _tiny().init(jax.random.key(0), None, None))


def test_batch_standardized_cnm_original_matches_numpy():
  """cnm_original="batch_standardized": the original map standardised per channel over (B, H, W) with its biased
  batch variance and eps 1e-5, then average-pooled (NumPy float64 from the backbone's original map)."""
  model = _tiny(anm_stage=4, cnm_original="batch_standardized")
  visible, infrared = _images(2)
  variables = _random_variables(model, visible, infrared, seed=2)

  @jax.jit  # one compiled program instead of one per op; ANM's input is returned as an output.
  def apply_recording(variables, visible, infrared):
    seen = []

    def record_anm_input(next_fun, args, kwargs, context):
      if isinstance(context.module, frequency.ANM):
        seen.append(args[0])  # with ANM after the last stage its input is the original map.
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_anm_input):
      out, _ = model.apply(variables, visible, infrared, train=True, mutable=["batch_stats"])
    return out, seen[0]

  out, anm_input = apply_recording(variables, visible, infrared)
  x = np.asarray(anm_input, np.float64)
  standardized = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
  # float32 arithmetic on O(1) values over a 4x2x256 map: ~1e-6 absolute; 1e-5 leaves room for the sums' order.
  np.testing.assert_allclose(out["cnm_original"], standardized.mean(axis=(1, 2)), atol=1e-5)
  np.testing.assert_allclose(out["global"], x.mean(axis=(1, 2)), atol=1e-5)


# 128 x 64 images: layer4 maps of 8 x 4 bins (tests/configs/tiny_fdnm.py says why 2 x 1 maps are degenerate).
_EQ_SHAPE = (2, 128, 64, 3)


@pytest.mark.parametrize("anm_bn, holds", [("joint", True), ("per_branch", True), ("none", True),
                                           ("reference", False)])
def test_eval_mode_equals_train_mode_with_the_batch_statistics(anm_bn, holds):
  """With bn_momentum 0 a train-mode pass stores each BatchNorm's batch statistics as its running statistics;
  eval mode with them must give the train-mode outputs when every BatchNorm is applied once per forward pass
  (anm_bn joint / per_branch / none). The reference reading calls ANM's BN once per branch with each branch's
  statistics but stores only one set, so there its nuances must differ (the claim does not hold)."""
  model = FDNM(num_classes=NUM_CLASSES, stage_sizes=(1, 1, 1, 1), width=4, agp_stages=(1, 2), anm_stage=4,
               bn_momentum=0.0, anm_bn=anm_bn)
  rng = np.random.default_rng(3)
  visible, infrared = (rng.normal(size=_EQ_SHAPE).astype(np.float32) for _ in range(2))
  variables = _random_variables(model, visible, infrared, seed=3)
  train_out, updated = _apply_train(model, variables, visible, infrared)
  eval_out = _apply_eval(model, {**variables, "batch_stats": updated["batch_stats"]}, visible, infrared)
  # Both passes run the same float32 ops on the same values; only XLA's fusion of the statistics differs (a few
  # ulps, 2^-24 relative, per layer, through ~20 normalised layers): 1e-4 relative of each output's scale is far
  # above that and far below the O(1) change a wrong statistic makes (the reference case below).
  for key in ("global", "nuances", "features", "logits", "embedding"):
    a, b = np.asarray(eval_out[key]), np.asarray(train_out[key])
    scale = np.max(np.abs(b))
    if holds:
      np.testing.assert_allclose(a, b, atol=1e-4 * scale, err_msg=key)
    elif key == "nuances":
      assert np.max(np.abs(a - b)) > 1e-2 * scale
