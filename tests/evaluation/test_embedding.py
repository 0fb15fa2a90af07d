"""The test embedding (evaluator.embedding_parts / make_embed_fn), the flip test-time augmentation and the
retrieval distance, against NumPy from the tiny FDNM's outputs and variables.

References: DEEN's test code (ZYK100/LLCM DEEN/test.py) scores distmat = sum over (pooled, BNNeck) x (original,
nuance1, nuance2) of the cosine matrices of L2-normalised features, each feature the sum of the image's and its
mirror's (not re-normalised); the BNNeck is an eval-mode BatchNorm without bias, eps 1e-5 (FDNM_SPEC §1.4).
Tolerances: float32 model outputs against float64 NumPy on the same pre-BN features; a sum of six cosines, each
rounded to ~1e-7 relative, so 1e-5 absolute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import default
from fdnm_jax import sharding
from fdnm_jax.evaluation import evaluator, pairwise_distance
from fdnm_jax.models import FDNM
from input_pipeline.datasets.image_set import VISIBLE, ImageSet
from tests.rounding import U

# 64 x 32 images: at 32 x 16 the tiny FDNM's ANM (after stage 4) instance-normalises a 2 x 1 amplitude grid whose
# variance can sit far below its eps (1e-5), which multiplies its input's float32 rounding by up to 1/sqrt(eps)
# (~300); a 4 x 2 grid keeps the features well conditioned. No tolerance here rests on the forward pass's own float32
# error: the NumPy references start from the model's float32 features, and the embedding function is compared bit
# for bit with the same composition compiled again.
H, W = 64, 32
BNNECK_EPS = 1e-5


D = 256  # the tiny model's final channels (width 8 x 8 x 4).


def _model(**kwargs):
  return FDNM(num_classes=4, stage_sizes=(1, 1, 1, 1), width=8, **kwargs)


def _variables(model, seed=0):
  """Variables of init's tree filled from NumPy (no init compile): fan-in scaled kernels, BN statistics and
  scales near 1, and BNNeck running statistics that are not the identity (so the BNNeck does something)."""
  x = jax.ShapeDtypeStruct((2, H, W, 3), jnp.float32)
  shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, v), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", k) for k in path]
    if names[-1] == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if names[-1] in ("scale", "var"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  stats = variables["batch_stats"]["bnneck"]
  stats["var"] = rng.uniform(0.01, 0.1, stats["var"].shape).astype(np.float32)
  return variables


def _images(n, seed):
  return np.random.default_rng(seed).normal(size=(n, H, W, 3)).astype(np.float32)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_bnneck(pooled, variables):
  """Eval-mode BNNeck of pre-BN pooled features [.., D] (scale, no bias), float64."""
  stats, scale = variables["batch_stats"]["bnneck"], variables["params"]["bnneck"]["scale"]
  return (np.asarray(pooled, np.float64) - np.asarray(stats["mean"])) / np.sqrt(
      np.asarray(stats["var"], np.float64) + BNNECK_EPS) * np.asarray(scale)


# One compiled forward pass per model (visible stem): the outputs dict the evaluator assembles embeddings from.
_OUTPUTS = jax.jit(lambda m, v, x: evaluator.model_outputs(m, v, x, None), static_argnums=0)


def _deen_branches(model, variables, out):
  """Per DEEN branch, the (pooled, BNNeck) features before normalisation, NumPy: the pooled pre-BN features of
  the model's outputs and a NumPy BNNeck of them."""
  branches = [(f, _numpy_bnneck(f, variables)) for f in np.asarray(out["features"])]  # [nb, B, D]
  if not model.anm_keep_original:  # the original is no branch: pooled only (no BNNeck output for it).
    branches = [(np.asarray(out["global"]), None)] + branches
  return branches


@pytest.mark.parametrize("keep_original", [True, False], ids=["six_parts", "five_parts"])
def test_deen_embedding_dot_product_is_the_sum_of_deens_cosine_matrices(keep_original):
  model = _model(anm_stage=4, anm_keep_original=keep_original)
  variables = _variables(model)
  images = _images(7, 1)  # queries 0..2, gallery 3..6
  out = jax.tree.map(np.asarray, _OUTPUTS(model, variables, images))
  emb = np.asarray(evaluator.test_embedding(out, "deen"), np.float64)
  q, g = emb[:3], emb[3:]
  want = np.zeros((3, 4))
  count = 0
  for pooled, bn in _deen_branches(model, variables, out):
    want += _unit(pooled[:3]) @ _unit(pooled[3:]).T
    count += 1
    if bn is not None:
      want += _unit(bn[:3]) @ _unit(bn[3:]).T
      count += 1
  assert count == (6 if keep_original else 5)
  assert emb.shape == (7, count * D)
  np.testing.assert_allclose(q @ g.T, want, atol=1e-5)
  np.testing.assert_allclose(-np.asarray(pairwise_distance(q.astype(np.float32), g.astype(np.float32))), want,
                             atol=1e-5)
  layout = evaluator.embedding_layout(model, variables, "deen", (H, W))
  assert [n for n, _ in layout] == ((["original/pooled", "original/bnneck"] if keep_original else ["original/pooled"])
                                    + ["nuance1/pooled", "nuance1/bnneck", "nuance2/pooled", "nuance2/bnneck"])
  assert all(w == D for _, w in layout)


def test_spec_embedding_is_the_normalised_bnneck_features_of_the_nuance_branches():
  model = _model(anm_stage=4)
  variables = _variables(model)
  images = _images(3, 3)
  out = jax.tree.map(np.asarray, _OUTPUTS(model, variables, images))
  got = np.asarray(evaluator.test_embedding(out, "spec"))
  want = np.concatenate([_unit(bn) for _, bn in _deen_branches(model, variables, out)[1:]], axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The model's own spec embedding: the same float32 BNNeck rows normalised in another program. Per side, the sum of
  # D squares errs by <= D u relative, its sqrt by D u / 2 + u, the division by u: every element of a row is off by
  # <= (D / 2 + 2) u relative, (D + 4) u ~ 1.5e-5 between the two.
  np.testing.assert_allclose(got, out["embedding"], rtol=(D + 4) * U, atol=0)
  assert [n for n, _ in evaluator.embedding_layout(model, variables, "spec", (H, W))] == [
      "nuance1/bnneck", "nuance2/bnneck"]


def test_unknown_embedding_names_the_field():
  with pytest.raises(ValueError, match="evals.embedding='pooled'"):
    evaluator.make_embed_fn(_model(), sharding.make_mesh(default.get_config().mesh), "visible", "pooled")


def test_flip_embedding_is_the_unnormalised_sum_of_the_image_and_its_mirror(tmp_path):
  rng = np.random.default_rng(0)
  paths, mirrors = [], []
  for i in range(5):
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    for folder, image in ((paths, pixels), (mirrors, pixels[:, ::-1])):
      path = str(tmp_path / f"{i}_{len(folder)}_{id(folder)}.png")
      tf.io.write_file(path, tf.io.encode_png(np.ascontiguousarray(image)))
      folder.append(path)
  sets = [ImageSet(tuple(p), np.arange(5), np.ones(5), VISIBLE) for p in (paths, mirrors)]
  config = default.get_config()
  config.input.height, config.input.width, config.input.eval_batch_size = H, W, 4  # stored size: no resampling.
  mesh = sharding.make_mesh(config.mesh)
  model = _model(anm_stage=4)
  variables = _variables(model)
  embed = evaluator.make_embed_fn(model, mesh, "visible", "spec")
  flipped = evaluator.embed_image_set(embed, variables, sets[0], config.input, mesh, flip=True)
  plain, mirrored = (evaluator.embed_image_set(embed, variables, s, config.input, mesh, flip=False) for s in sets)
  # The stored size needs no resampling, the flip commutes with the per-pixel normalisation, and the batches hold
  # the same images at the same rows: the same compiled program sees the same inputs, so the float32 sums are equal.
  np.testing.assert_array_equal(flipped, plain + mirrored)
  part_norms = np.linalg.norm(flipped.reshape(5, 2, -1), axis=-1)  # each part: |a + b| for unit a, b: not 1.
  assert np.all(part_norms < 2.0) and not np.allclose(part_norms, 1.0, atol=1e-3)


def test_embed_functions_and_layouts_are_kept_per_model_and_each_model_gets_its_own():
  """make_embed_fn and embedding_layout are kept across evaluations: equal models (the same fields) share one
  function; a model with other fields (a wider one: 2 x D channels) gets its own, whose embeddings have its
  width, as its layout says."""
  mesh = sharding.make_mesh(default.get_config().mesh)
  narrow, wide = _model(anm_stage=4), FDNM(num_classes=4, stage_sizes=(1, 1, 1, 1), width=16, anm_stage=4)
  fn = evaluator.make_embed_fn(narrow, mesh, "visible", "spec")
  assert evaluator.make_embed_fn(_model(anm_stage=4), mesh, "visible", "spec") is fn
  assert evaluator.make_embed_fn(narrow, mesh, "infrared", "spec") is not fn
  assert evaluator.make_embed_fn(narrow, mesh, "visible", "deen") is not fn
  images = _images(2, 5)
  for model, width in ((narrow, D), (wide, 2 * D)):
    variables = _variables(model)
    layout = evaluator.embedding_layout(model, variables, "spec", (H, W))
    assert layout == [("nuance1/bnneck", width), ("nuance2/bnneck", width)]
    emb = np.asarray(evaluator.make_embed_fn(model, mesh, "visible", "spec")(variables, images))
    assert emb.shape == (2, 2 * width)
    # The visible stem's spec embedding of this model, test_embedding(model_outputs(...)), jitted as one program:
    # the same computation the embed function compiles (its shardings are trivial on the tests' one-device mesh),
    # so the same floats. (A separately compiled forward pass would differ by the features' float32 error.)
    composed = jax.jit(lambda v, x, m=model: evaluator.test_embedding(evaluator.model_outputs(m, v, x, None), "spec"))
    np.testing.assert_array_equal(emb, composed(variables, images))
