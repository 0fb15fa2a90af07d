"""Precise BN (fdnm_jax/precise_bn.py): sequential recalibration against NumPy recomputations, its level structure,
and where its results go.

Tolerances: the recalibration computes per-batch moments in float32 inside XLA and pools them in float64; the NumPy
references compute the same quantities from the same float32 inputs in float64. The gap is float32 rounding of
short dot products and of the per-batch means (relative ~1e-7 .. 1e-6), so rtol 1e-5 bounds it with margin on both
CPU code paths; atol covers channels whose mean is near zero (relative to the data's scale).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdnm_jax import precise_bn, sharding
from fdnm_jax.models import FDNM
from tests import shared_runs

EPS = 1e-5  # nn.BatchNorm's default epsilon (the toy's BatchNorms).


class Toy(nn.Module):
  """x -> dense1 -> bn1 -> relu -> dense2 -> bn2 -> a `shared` BN called on two maps of it (as ANM's BN per
  branch) -> their sum -> `after`; a `side` BN on x itself."""

  @nn.compact
  def __call__(self, visible, infrared, train=False):
    x = jnp.concatenate([visible, infrared], axis=0)
    norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    side = norm("side")(x)
    h = nn.relu(norm("bn1")(nn.Dense(4, name="dense1")(x)))
    z = norm("bn2")(nn.Dense(3, name="dense2")(h))
    shared = norm("shared")
    return norm("after")(shared(2.0 * z) + shared(nn.relu(-z))) + side.mean()


def _toy_variables():
  rng = np.random.default_rng(0)
  x = jnp.zeros((2, 3, 2, 3))
  shapes = jax.eval_shape(lambda: Toy().init(jax.random.key(0), x, x))
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  # Running statistics far from the data's, so a recalibration that used them upstream would be visibly wrong.
  for name in ("side", "bn1", "bn2", "shared", "after"):
    stats = variables["batch_stats"][name]
    stats["mean"] = np.full_like(stats["mean"], 5.0)
    stats["var"] = np.full_like(stats["var"], 10.0)
  return variables


def _toy_batches(num=3):
  rng = np.random.default_rng(1)
  return [{"visible": rng.normal(1.0, 2.0, (2, 3, 2, 3)).astype(np.float32),
           "infrared": rng.normal(-0.5, 1.0, (2, 3, 2, 3)).astype(np.float32)} for _ in range(num)]


def _population(arrays):
  """float64 mean and biased variance over every axis but the last, of the arrays concatenated."""
  x = np.concatenate([np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1]) for a in arrays])
  return x.mean(axis=0), x.var(axis=0)


def _bn(x, mean, var, p):
  return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


@pytest.mark.parametrize("per_call", [False, True], ids=["pooled", "per_call"])
def test_sequential_recalibration_of_a_toy_equals_numpy_layer_by_layer(per_call):
  variables = _toy_variables()
  batches = _toy_batches()
  new, info = precise_bn.recalibrate(Toy(), variables, batches, per_call=per_call)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xs = [np.concatenate([b["visible"], b["infrared"]]).astype(np.float64) for b in batches]
  # Level 1: side and bn1 see x and dense1(x): nothing upstream is normalised.
  side = _population(xs)
  h1 = [x @ p["dense1"]["kernel"] + p["dense1"]["bias"] for x in xs]
  bn1 = _population(h1)
  # Level 2: bn2's input with bn1 normalising by its recalibrated statistics.
  h2 = [np.maximum(_bn(h, *bn1, p["bn1"]), 0) @ p["dense2"]["kernel"] + p["dense2"]["bias"] for h in h1]
  bn2 = _population(h2)
  # Level 3: the shared BN's two calls, with bn2 recalibrated; its batch_stats pool both calls.
  z = [_bn(h, *bn2, p["bn2"]) for h in h2]
  calls = [[2.0 * v for v in z], [np.maximum(-v, 0) for v in z]]
  shared = _population(calls[0] + calls[1])
  per_call_stats = [_population(c) for c in calls]
  # Level 4: `after` sees the sum of the shared BN's calls, each normalised as eval mode does in this mode.
  used = per_call_stats if per_call else [shared, shared]
  after = _population([_bn(a, *used[0], p["shared"]) + _bn(b, *used[1], p["shared"]) for a, b in zip(*calls)])
  want = {"side": side, "bn1": bn1, "bn2": bn2, "shared": shared, "after": after}
  got = {name: (new["batch_stats"][name]["mean"], new["batch_stats"][name]["var"]) for name in want}
  if per_call:
    rows = new[precise_bn.PER_CALL]["shared"]
    for j in range(2):
      want[f"shared call {j}"] = per_call_stats[j]
      got[f"shared call {j}"] = (rows["mean"][j], rows["var"][j])
    assert list(new[precise_bn.PER_CALL]) == ["shared"]
  else:
    assert precise_bn.PER_CALL not in new
  for name, (mean, var) in want.items():
    scale = float(np.sqrt(var.max()))
    np.testing.assert_allclose(got[name][0], mean, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    np.testing.assert_allclose(got[name][1], var, rtol=1e-5, err_msg=name)
  assert not np.allclose(per_call_stats[0][0], per_call_stats[1][0], rtol=0.1)  # the two calls differ.
  assert info["levels"] == 4 and info["forward_passes"] == 12 and info["batches"] == 3 and info["uncalled"] == []
  assert info["per_call"] == (["shared"] if per_call else [])
  # Pure: the input variables keep their statistics.
  assert float(np.asarray(variables["batch_stats"]["bn2"]["mean"])[0]) == 5.0


def test_per_call_model_with_the_running_statistics_in_every_row_is_the_plain_model():
  variables = _toy_variables()
  b = _toy_batches(1)[0]
  rows = {name: np.broadcast_to(variables["batch_stats"]["shared"][name], (2, 3)) for name in ("mean", "var")}
  wrapped = precise_bn.PerCallModel(Toy())
  plain = Toy().apply(variables, b["visible"], b["infrared"])
  same = wrapped.apply({**variables, precise_bn.PER_CALL: {"shared": rows}}, b["visible"], b["infrared"])
  np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))  # the same Flax arithmetic, bit for bit.
  rows = {"mean": rows["mean"] + np.array([[0.0], [1.0]]), "var": rows["var"]}  # call 1 shifted: output changes.
  moved = wrapped.apply({**variables, precise_bn.PER_CALL: {"shared": rows}}, b["visible"], b["infrared"])
  assert not np.allclose(np.asarray(moved), np.asarray(plain))


def test_the_toy_levels_follow_the_data_flow():
  variables = _toy_variables()
  b = _toy_batches(1)[0]
  levels, uncalled = precise_bn.dependency_levels(Toy(), variables, b["visible"], b["infrared"])
  assert levels == [["side", "bn1"], ["bn2"], ["shared"], ["after"]] and uncalled == []


@pytest.mark.parametrize("stage_sizes,expected", [((1, 1, 1, 1), 15), ((3, 4, 6, 3), 51)])
def test_fdnm_levels_are_the_bottleneck_chain_depth(stage_sizes, expected):
  """Levels = 1 (both stems) + 3 per bottleneck (bn1 with the downsample BN, bn2, bn3) + ANM's bn + BNNeck."""
  assert expected == 1 + 3 * sum(stage_sizes) + 2
  model = FDNM(num_classes=4, stage_sizes=stage_sizes, width=8, agp_stages=(1, 2), anm_stage=4)
  x = jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, v), x)
  levels, uncalled = precise_bn.dependency_levels(model, variables, x, x)
  assert len(levels) == expected and uncalled == []
  assert levels[0] == ["visible_stem/bn1", "infrared_stem/bn1"]
  assert levels[1] == ["layer1/block0/bn1", "layer1/block0/downsample_bn"]
  assert levels[-2:] == [["anm/bn"], ["bnneck"]]


def _filled_variables(model, batch):
  """Variables of init's tree filled from NumPy (no init compile): fan-in scaled kernels, scales and running
  variances in [0.8, 1.2], other leaves N(0, 0.1)."""
  shapes = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), batch["visible"], batch["infrared"])
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = getattr(path[-1], "key", path[-1])
    if name == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_fdnm_bnneck_statistics_equal_those_of_the_eval_mode_features():
  """The BNNeck's recalibrated statistics are the population statistics of what eval mode feeds it: the pooled
  features of both nuance branches, computed with every upstream BatchNorm recalibrated (ANM's per branch)."""
  model = FDNM(num_classes=4, stage_sizes=(1, 1, 1, 1), width=8, agp_stages=(1, 2), anm_stage=4)
  # 64 x 32 images: at 32 x 16 ANM's instance norm over a 2 x 1 amplitude grid multiplies float32 rounding by up to
  # 1/sqrt(eps) ~ 300 (tests/evaluation/test_embedding.py), and recalibration's level-by-level programs and the
  # eval apply then differ by ~1e-4, beyond these float32 bounds.
  rng = np.random.default_rng(0)
  batches = [{"visible": rng.normal(size=(3, 64, 32, 3)).astype(np.float32),
              "infrared": rng.normal(size=(3, 64, 32, 3)).astype(np.float32)} for _ in range(2)]
  variables = _filled_variables(model, batches[0])
  new, info = precise_bn.recalibrate(model, variables, batches, per_call=True)
  assert info["per_call"] == ["anm/bn"]
  evaluated = precise_bn.PerCallModel(model)  # ANM's BN normalises each branch with that branch's statistics.
  apply = jax.jit(lambda v, a, b: evaluated.apply(v, a, b, train=False)["features"])
  feats = [np.asarray(apply(new, b["visible"], b["infrared"])) for b in batches]  # [2 branches, B, D] each
  mean, var = _population([f.reshape(-1, f.shape[-1]) for f in feats])
  got = new["batch_stats"]["bnneck"]
  # Two float32 programs of this model (recalibration's level by level, the eval apply) sum in other orders. With
  # independent roundings a K-term sum is off by ~sqrt(K) * u (1 sigma, u = 2^-24) of its scale: K <= 576 (3 x 3 x
  # 64) gives 1.4e-6 per conv, ~6e-6 over the deepest path's ~17 convs and 3 FFT round trips (in quadrature), so the
  # two programs' features differ by ~8e-6 of their scale (1 sigma). The 24 features a statistic averages (2
  # batches x 3 images x 2 branches) bring the mean's error to ~1.7e-6 of the features' std and the variance's to
  # ~3.4e-6 relative: the bounds below are ~6 sigma. The kernels decide where a run lands (1e-6 held with YNNPACK's
  # AVX-512 kernels and missed without them: `XLA_FLAGS="--xla_cpu_max_isa=AVX2
  # --xla_cpu_experimental_ynn_fusion_type="`, docs/benchmarks.md, tenth pass).
  np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-5 * float(np.sqrt(var.max())))
  np.testing.assert_allclose(got["var"], var, rtol=2e-5)
  # The checkpoint's (init) statistics were not those: the test can fail.
  assert not np.allclose(variables["batch_stats"]["bnneck"]["var"], var, rtol=0.1)
  assert info["levels"] == 15 and info["forward_passes"] == 30


@pytest.mark.slow
def test_recalibration_is_saved_beside_the_checkpoint_reused_and_leaves_it_byte_identical(caplog, tmp_path):
  """A run trained with the reference reading (ANM's one BN called per branch: the checkpoint precise BN must rescue,
  issue 19) gets per-call statistics, saved beside its checkpoint and reused."""
  from fdnm_jax import inference, run_config, train  # pylint: disable=g-import-not-at-top
  from fdnm_jax import eval_mode  # pylint: disable=g-import-not-at-top
  from tests.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.update(run_config.REFERENCE_READING)
  workdir = str(tmp_path / "reference_reading")
  train.train_and_evaluate(config, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = shared_runs.file_digests(checkpoints)
  config.evals.recalibrate_bn_batches = 2
  report = eval_mode.evaluate_checkpoint(config, workdir)
  folder = os.path.join(workdir, "recalibrated_bn", "4", "batches2_per_call")
  info = report["precise_bn"]
  assert info["path"] == folder and info["reused"] is False and info["batches"] == 2
  assert info["images"] == 2 * 2 * 4 * 2 and info["levels"] == 15 and info["forward_passes"] == 30
  assert info["per_call_modules"] == ["anm/bn"]
  assert sorted(os.listdir(folder)) == ["meta.json", "stats.npz"]
  assert shared_runs.file_digests(checkpoints) == before
  with open(report["files"]["md"]) as f:
    markdown = f.read()
  assert "**recalibrated** (precise BN) on 2 un-augmented training batches" in markdown
  # Health in the eval report (JSON, Markdown, log) and in training's final report; its numbers: test_health.py.
  with open(os.path.join(workdir, "results", "tiny.json")) as f:
    trained_report = json.load(f)
  for h in (report["health"], trained_report["health"]):
    cosines = h["mean_cosine_to_mean"]
    assert set(cosines) == {"nuance1/bnneck", "nuance2/bnneck", "embedding"}
    assert all(set(v) == {"visible", "infrared"} and all(-1 <= c <= 1 for c in v.values()) for v in cosines.values())
    assert bool(h["warnings"]) == any(c > 0.95 for v in cosines.values() for c in v.values())
    assert set(h["bnneck_running_var"]["bnneck"]) == {"min", "p5", "median", "p95", "max"}
  assert "bnneck_running_var_checkpoint" in report["health"] and trained_report["precise_bn"] is None
  assert "## Embedding health" in markdown
  logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert all(w in logged for w in report["health"]["warnings"])
  # Extraction loads the saved statistics instead of recomputing, and they are not the checkpoint's.
  saved = dict(np.load(os.path.join(folder, "stats.npz")))
  _, model, variables = inference.load_model(workdir, config=config)
  assert isinstance(model, precise_bn.PerCallModel)
  np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["bnneck"]["var"]), saved["batch_stats/bnneck/var"])
  np.testing.assert_array_equal(np.asarray(variables["per_call_stats"]["anm"]["bn"]["mean"]),
                                saved["per_call_stats/anm/bn/mean"])
  checkpoint_variables, _ = inference.restore_variables(workdir, 4, config, sharding.make_mesh(config.mesh))
  assert not np.allclose(saved["batch_stats/bnneck/var"],
                         np.asarray(checkpoint_variables["batch_stats"]["bnneck"]["var"]))
  _, _, again = precise_bn.for_evaluation(model.model, checkpoint_variables, config, sharding.make_mesh(config.mesh),
                                          workdir, 4)
  assert again["reused"] is True and again["levels"] == 15
  assert shared_runs.file_digests(checkpoints) == before
