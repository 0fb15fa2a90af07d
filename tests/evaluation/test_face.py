"""The face protocol: VR@FAR against a hand-worked case and an independent ROC sweep, Rank-1 by hand, folds.

The ROC reference sorts every genuine and impostor score, sweeps a threshold over each distinct score (plus one
above all), computes FAR and VR at each (accept score >= threshold) and keeps the best VR whose FAR <= f: the
textbook definition, with no closed form and no code shared with `face.verification_rate`.
"""

import json

import ml_collections
import numpy as np
import pytest

from fdnm_jax.evaluation import aggregate, evaluator, face, protocols
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet
from input_pipeline.sources import DataSource, EvalDirection
from tests.rounding import U64


def roc_reference(genuine, impostor, far):
  """Best VR over thresholds t (accept >= t) with FAR(t) <= far, by sweeping every distinct score."""
  genuine, impostor = np.asarray(genuine, float), np.asarray(impostor, float)
  thresholds = np.concatenate([np.unique(np.concatenate([genuine, impostor])), [np.inf]])
  best = 0.0
  for t in thresholds:
    fa = np.sum(impostor >= t) / len(impostor)
    vr = np.sum(genuine >= t) / len(genuine)
    # far has at most 3 decimals and at most 3,480 impostors are swept here, so a FAR k / n other than far is at
    # least 1 / (1000 n) > 2.8e-7 away from it, while k / n == far in decimals rounds to within 1 ulp (~1e-16) of
    # the float far: 1e-12 admits exactly the ties.
    if fa <= far + 1e-12:
      best = max(best, vr)
  return best


def test_verification_rate_hand_worked():
  # 10 impostors; FAR 10 % allows floor(0.1 * 10) = 1 accepted impostor, so the threshold sits just above the
  # 2nd highest impostor score 0.7: genuine 0.9, 0.8 pass, 0.7 (tied with that impostor) and 0.2 do not -> 2/4.
  impostor = [0.95, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1]
  genuine = [0.9, 0.8, 0.7, 0.2]
  assert face.verification_rate(genuine, impostor, 0.1) == 0.5
  # FAR 0 %: no impostor accepted -> threshold above 0.95: no genuine passes.
  assert face.verification_rate(genuine, impostor, 0.0) == 0.0
  # FAR 30 %: 3 impostors (0.95, 0.7, 0.6) accepted, threshold above 0.5: 0.9, 0.8, 0.7 pass -> 3/4.
  assert face.verification_rate(genuine, impostor, 0.3) == 0.75
  # FAR 29 % of 100 impostors is 29 impostors, not 28 (floating point: 0.29 * 100 = 28.999...).
  imp = np.arange(100, dtype=float)  # scores 0..99; 29 accepted -> threshold above 70.
  assert face.verification_rate([70.0, 70.5, 71.0], imp, 0.29) == 2 / 3  # count / n: one float64 division, as here.
  # FAR 100 %: everything accepted.
  assert face.verification_rate([-5.0], impostor, 1.0) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_verification_rate_matches_an_independent_roc_sweep(seed):
  rng = np.random.default_rng(seed)
  n_gen, n_imp = rng.integers(5, 60), rng.integers(50, 3000)
  # Quantised scores make ties between and within the two groups common.
  genuine = np.round(rng.normal(0.5, 0.3, n_gen), 2)
  impostor = np.round(rng.normal(0.0, 0.3, n_imp), 2)
  # Both are a count of genuine scores over len(genuine), one float64 division: equal counts give equal floats.
  for far in (0.0, 0.001, 0.01, 0.05, 0.1, 0.37, 1.0):
    assert face.verification_rate(genuine, impostor, far) == roc_reference(genuine, impostor, far), far


def test_verification_rate_rejects_bad_input():
  with pytest.raises(ValueError, match="fraction"):
    face.verification_rate([1.0], [0.0], 1.5)
  with pytest.raises(ValueError, match="impostor"):
    face.verification_rate([1.0], [], 0.01)


def test_cosine_similarity_is_the_normalised_dot_product():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
  want = np.array([[np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
  # float64, E = 6: a dot product errs by <= E u64 |x| |y|, each norm by <= (E / 2 + 1) u64 relative, each division
  # u64: <= (2 E + 4) u64 = 16 u64 of the cosine's scale 1 per side (absolute, as the error scales with |x| |y|, not
  # with the cosine), 32 u64 ~ 3.6e-15 for the two.
  np.testing.assert_allclose(face.cosine_similarity(a, b), want, rtol=0, atol=2 * (2 * 6 + 4) * U64)


def test_rank1_and_ranks_hand_worked():
  # gallery subjects 7, 8, 9 (one image each); probes of 7, 8, 8, 9.
  scores = np.array([[0.9, 0.1, 0.2],    # probe 7: best is 7 -> rank 1
                     [0.3, 0.5, 0.6],    # probe 8: 9 beats 8 -> rank 2
                     [0.4, 0.4, 0.0],    # probe 8: tie with 7 counts against it -> rank 2
                     [0.8, 0.7, 0.1]])   # probe 9: 7 and 8 beat it -> rank 3
  ranks = face.subject_ranks(scores, [7, 8, 8, 9], [7, 8, 9])
  np.testing.assert_array_equal(ranks, [1, 2, 2, 3])
  # A subject with two gallery images scores its best one; a probe whose subject has no gallery image gets 0.
  scores2 = np.array([[0.1, 0.7, 0.5], [0.9, 0.2, 0.3]])
  np.testing.assert_array_equal(face.subject_ranks(scores2, [5, 6], [4, 5, 5]), [1, 0])


def _fold_embeddings(rng, subjects, probes_per_subject, noise):
  """Gallery: one embedding per subject; probes: that embedding plus noise (some probes land on another subject)."""
  centers = rng.normal(size=(len(subjects), 8))
  n = len(subjects) * probes_per_subject
  probe = np.repeat(centers, probes_per_subject, axis=0) + noise * rng.normal(size=(n, 8))
  return centers, np.asarray(subjects), probe, np.repeat(subjects, probes_per_subject)


def _reference_fold(g_emb, g_lab, p_emb, p_lab):
  """Rank-1 by argmax, VR@FAR by the ROC sweep, all from a plain cosine matrix (one gallery image per subject)."""
  g = g_emb / np.linalg.norm(g_emb, axis=1, keepdims=True)
  p = p_emb / np.linalg.norm(p_emb, axis=1, keepdims=True)
  s = p @ g.T
  rank1 = np.mean(g_lab[np.argmax(s, axis=1)] == p_lab)
  same = p_lab[:, None] == g_lab[None, :]
  return {"rank1": 100 * rank1, "vr_far_1": 100 * roc_reference(s[same], s[~same], 0.01),
          "vr_far_0_1": 100 * roc_reference(s[same], s[~same], 0.001)}


def _face_source(rng, folds):
  test_sets, emb, refs = {}, {}, {}
  for k in folds:
    subjects = list(range(100 * k, 100 * k + 30))
    g_emb, g_lab, p_emb, p_lab = _fold_embeddings(rng, subjects, 4, noise=0.9)
    test_sets[f"gallery_{k}"] = ImageSet(tuple(f"g{k}_{i}" for i in range(len(g_lab))), g_lab,
                                         np.ones(len(g_lab)), VISIBLE)
    test_sets[f"probe_{k}"] = ImageSet(tuple(f"p{k}_{i}" for i in range(len(p_lab))), p_lab,
                                       np.ones(len(p_lab)), INFRARED)
    emb[f"gallery_{k}"], emb[f"probe_{k}"] = g_emb.astype(np.float32), p_emb.astype(np.float32)
    refs[k] = _reference_fold(g_emb.astype(np.float32), g_lab, p_emb.astype(np.float32), p_lab)
  train = ImageSet(("t0", "t1"), [100, 999], [1, 1], VISIBLE)  # subject 100 is a fold-1 test subject.
  source = DataSource(name="casia_nir_vis", protocol="face", train_visible=train,
                      train_infrared=ImageSet(("t2",), [999], [1], INFRARED), test_sets=test_sets,
                      directions=(EvalDirection("nir_to_vis", "probe", "gallery"),))
  return source, emb, refs


def test_protocol_dispatch_scores_each_fold_and_the_mean_and_std_over_folds():
  rng = np.random.default_rng(1)
  source, emb, refs = _face_source(rng, (1, 2, 3))
  config = ml_collections.ConfigDict({"data": {"fold": 1, "trial": 1}, "evals": {"face_folds": (1, 2, 3)}})
  settings = protocols.settings_for(source, config)
  assert [(s.name, s.protocol, s.trials) for s in settings] == [("nir_to_vis", "face", (1, 2, 3))]
  results = protocols.run_protocols(source, emb, settings)
  r = results["nir_to_vis"]
  assert [t["fold"] for t in r["per_trial"]] == [1, 2, 3]
  for t in r["per_trial"]:
    # Rank-1 and VR are 100 x counts / n, the reference's from float32 scores: the same counts (no score within
    # float32 rounding of the deciding one) through the same float64 operations give the same floats.
    for key in face.METRICS:
      assert t[key] == refs[t["fold"]][key], (t["fold"], key)
    assert t["num_query"] == 120 and t["num_gallery"] == 30 and t["num_genuine"] == 120
  assert 0 < r["mean"]["rank1"] < 100  # the noise makes some probes fail: the numbers are not trivially 100.
  for key in face.METRICS:
    values = [refs[k][key] for k in (1, 2, 3)]  # the per-fold numbers themselves (above): the same np.mean, np.std.
    assert r["mean"][key] == np.mean(values)
    assert r["std"][key] == np.std(values)
  assert [t["train_overlap_subjects"] for t in r["per_trial"]] == [1, 0, 0]
  # the default scores only the trained fold.
  config.evals.face_folds = ()
  assert protocols.settings_for(source, config)[0].trials == (1,)
  with pytest.raises(ValueError, match="re-ranking"):
    protocols.run_protocols(source, emb, settings, rerank=protocols.Rerank(20, 6, 0.3))

  table = protocols.format_protocol_table(results)
  assert "VR@FAR=1%" in table and "VR@FAR=0.1%" in table
  assert f"{r['mean']['vr_far_0_1']:.2f} ± {r['std']['vr_far_0_1']:.2f}" in table
  row = evaluator.summary_row(r)
  flat = evaluator.format_table({"nir_to_vis": row})
  assert flat.splitlines()[0] == "| setting | Rank-1 | VR@FAR=1% | VR@FAR=0.1% |"
  assert f"{r['mean']['rank1']:.2f} ± {r['std']['rank1']:.2f}" in flat


def test_fold_reports_aggregate_to_mean_and_std(tmp_path, capsys):
  rng = np.random.default_rng(2)
  values = {k: {m: float(rng.uniform(50, 100)) for m in face.METRICS} for k in (1, 2, 3, 4)}
  # Three one-fold training reports with their config.json beside results/, and one eval-mode report.
  paths = []
  for k in (1, 2, 3):
    run = tmp_path / f"casia_f{k}"
    (run / "results").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"fold": k}, "evals": {"face_folds": []}}))
    row = dict(values[k], trials=1, cmc=[0.5])
    (run / "results" / "casia.json").write_text(json.dumps({"name": "casia", "settings": {"nir_to_vis": row}}))
    paths.append(str(run / "results" / "casia.json"))
  eval_report = {"name": "casia", "settings": {"nir_to_vis": {"per_trial": [dict(values[4], trial=4)]}}}
  (tmp_path / "eval.json").write_text(json.dumps(eval_report))
  paths.append(str(tmp_path / "eval.json"))
  assert face.main(paths) == 0
  out = capsys.readouterr().out
  for m in face.METRICS:
    v = [values[k][m] for k in (1, 2, 3, 4)]
    assert f"{np.mean(v):.2f} ± {np.std(v):.2f}" in out  # NumPy's population std (ddof=0)
  assert "| nir_to_vis | 1,2,3,4 | 4 |" in out and "population std (ddof=0)" in out.splitlines()[0]
  assert face.main(["--sample_std"] + paths) == 0
  out = capsys.readouterr().out
  v = [values[k]["rank1"] for k in (1, 2, 3, 4)]
  assert f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" in out and "sample std (ddof=1)" in out
  with pytest.raises(ValueError, match="4 is scored by more than one report"):
    aggregate.aggregate([face.fold_numbers(eval_report), face.fold_numbers(eval_report)])
  assert face.main([paths[-1], paths[-1]]) == 1 and "scored by more than one report" in capsys.readouterr().err
  with pytest.raises(ValueError, match="config.json"):
    face.fold_numbers({"name": "x", "settings": {"nir_to_vis": dict(values[1], trials=1)}})
  with pytest.raises(ValueError, match="eval-mode report"):
    face.fold_numbers({"name": "x", "settings": {"nir_to_vis": dict(values[1], trials=2)}}, {"data": {"fold": 1}})
