"""The heterogeneous face protocol (CASIA NIR-VIS 2.0 "View 2"): NIR probes against a VIS gallery, per fold.

Per fold, every probe (NIR) image is compared with every gallery (VIS) image by the cosine similarity of their
embeddings (higher = more alike). From that score matrix:

  - Rank-1 (identification): the fraction of probes whose own subject is the best-scoring gallery subject. A
    subject's score is its best gallery image's score (the official gallery lists hold one VIS image per subject,
    where this is just that image's score). Ties count against the probe: rank = 1 + the number of *other*
    subjects scoring >= the true subject. A probe whose subject has no gallery image cannot be identified: it is
    left out of Rank-1 / the CMC and counted in "num_probe_without_gallery" (the official lists have none).
  - VR@FAR (verification): every (probe, gallery image) pair is genuine (same subject) or impostor. A pair is
    accepted when its score >= threshold t; FAR(t) = accepted impostors / impostors, VR(t) = accepted genuine
    pairs / genuine pairs. VR@FAR=f is the highest VR(t) over every threshold t with FAR(t) <= f. In closed
    form: with k = floor(f * n_impostor) impostor pairs allowed, the threshold lies just above s*, the
    (k+1)-th highest impostor score, so VR@FAR=f = #{genuine > s*} / n_genuine (a genuine score equal to s* is
    rejected, because accepting it would accept the tied impostor too); k >= n_impostor gives VR = 1. This is
    the value of the ROC curve's `tpr[fpr <= f][-1]` (sklearn `roc_curve`, as stephenkung/NIR_VIS_Face_Recognition
    `extract_features.py` reads VR@FAR=0.1%), written without sklearn. floor() gets a 1e-9 tolerance so that
    e.g. 0.29 * 100 counts 29 impostors, not 28.
  - Over folds: mean and NumPy's population std (ddof=0, as the ReID protocols here) of each fold's numbers.

All numbers are reported in percent. The protocol's data come from a `DataSource` whose test sets are named
`<query>_<fold>` / `<gallery>_<fold>` (e.g. "probe_3", "gallery_3"; `input_pipeline.datasets.casia_builder`);
a face `Setting` (protocol "face", `fdnm_jax.evaluation.protocols.settings_for`) lists the folds as its trials.

The standard protocol trains one model per fold (fold k's training subjects are disjoint from its test subjects,
not from other folds' test subjects). Scoring one model on several folds (`config.evals.face_folds`) therefore
reports, per fold, how many of that fold's test subjects the model was trained on ("train_overlap_subjects");
the standard 10-fold mean +- std comes from ten runs, one per `config.data.fold`, combined by `fold_numbers` and
the aggregator of every repeated experiment, `fdnm_jax.evaluation.aggregate`
(`python -m fdnm_jax.evaluation.face runs/casia_f*/results/<name>.json`, or `launch/trials.py
--dataset=casia_nir_vis --trials=1-10`, which also trains the folds).
"""

import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from fdnm_jax.errors import ConfigError, DataError
from fdnm_jax.evaluation import aggregate

FARS = (0.01, 0.001)  # the false accept rates of the reported verification rates (1 %, 0.1 %).
METRICS = ("rank1", "vr_far_1", "vr_far_0_1")  # report keys, percent.
LABELS = {"rank1": "Rank-1", "vr_far_1": "VR@FAR=1%", "vr_far_0_1": "VR@FAR=0.1%"}  # table headers.
FAMILY = ("CASIA NIR-VIS 2.0 View 2: per fold, NIR probes nir_probe_<fold>.txt against the VIS gallery "
          "vis_gallery_<fold>.txt; nothing sampled")
_FAR_KEYS = dict(zip(FARS, METRICS[1:]))
_TOLERANCE = 1e-9


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
  """float64 [Q, G] cosine similarities of the rows of `a` [Q, E] and `b` [G, E] (an all-zero row scores 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"cosine_similarity needs [Q, E] and [G, E] embeddings, got {a.shape} and {b.shape}")
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def genuine_impostor(scores: Any, probe_labels: Any, gallery_labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """The genuine (same subject) and impostor scores of every (probe, gallery image) pair.

  Args:
    scores: [Q, G] similarities; probe_labels: [Q] subjects; gallery_labels: [G] subjects.
  Returns:
    (genuine, impostor): float64 1-D arrays, in row-major pair order.
  """
  scores = np.asarray(scores, np.float64)
  probe_labels, gallery_labels = np.asarray(probe_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
  if scores.shape != (len(probe_labels), len(gallery_labels)):
    raise ValueError(f"scores have shape {scores.shape}, expected [{len(probe_labels)} probes, "
                     f"{len(gallery_labels)} gallery images]")
  same = probe_labels[:, None] == gallery_labels[None, :]
  return scores[same], scores[~same]


def verification_rate(genuine: Any, impostor: Any, far: float) -> float:
  """VR@FAR=`far` as a fraction in [0, 1]: the threshold rule of the module docstring.

  Args:
    genuine: 1-D genuine-pair scores (at least one); impostor: 1-D impostor-pair scores (at least one).
    far: the false accept rate, in [0, 1] (0.01 = 1 %).
  """
  genuine, impostor = np.asarray(genuine, np.float64).reshape(-1), np.asarray(impostor, np.float64).reshape(-1)
  if not 0.0 <= far <= 1.0:
    raise ValueError(f"far={far}: a false accept rate is a fraction in [0, 1] (0.001 = 0.1 %)")
  if len(genuine) == 0 or len(impostor) == 0:
    raise DataError(f"VR@FAR needs genuine and impostor pairs, got {len(genuine)} genuine and {len(impostor)} "
                    "impostor scores (a fold needs at least two gallery subjects with probes)")
  allowed = int(math.floor(far * len(impostor) + _TOLERANCE))
  if allowed >= len(impostor):
    return 1.0
  s_star = np.sort(impostor)[::-1][allowed]
  return float(np.count_nonzero(genuine > s_star)) / len(genuine)


def subject_ranks(scores: Any, probe_labels: Any, gallery_labels: Any) -> np.ndarray:
  """int64 [Q] rank (1 = best) of each probe's own subject among the gallery subjects; 0 = not in the gallery.

  A subject scores its best gallery image; rank = 1 + other subjects scoring >= it (ties count against the probe).
  """
  scores = np.asarray(scores, np.float64)
  probe_labels, gallery_labels = np.asarray(probe_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
  subjects = np.unique(gallery_labels)
  per_subject = np.full((scores.shape[0], len(subjects)), -np.inf)
  column = np.searchsorted(subjects, gallery_labels)
  for j in range(len(subjects)):
    per_subject[:, j] = scores[:, column == j].max(axis=1)
  ranks = np.zeros(len(probe_labels), np.int64)
  position = np.searchsorted(subjects, probe_labels)
  present = (position < len(subjects)) & (subjects[np.minimum(position, len(subjects) - 1)] == probe_labels)
  rows = np.flatnonzero(present)
  true = per_subject[rows, position[rows]]
  ranks[rows] = np.count_nonzero(per_subject[rows] >= true[:, None], axis=1)  # includes the subject itself.
  return ranks


def score_fold(probe_emb: Any, probe_labels: Any, gallery_emb: Any, gallery_labels: Any,
               max_rank: int = 20) -> dict[str, Any]:
  """One fold's numbers from its embeddings.

  Args:
    probe_emb: float [Q, E] NIR probe embeddings; probe_labels: [Q] subjects.
    gallery_emb: float [G, E] VIS gallery embeddings; gallery_labels: [G] subjects.
    max_rank: length of the CMC curve.
  Returns:
    {"rank1", "vr_far_1", "vr_far_0_1" (percent), "cmc" (fractions, max_rank long, over the probes whose
    subject is in the gallery), "num_query", "num_gallery", "num_genuine", "num_impostor",
    "num_probe_without_gallery"}.
  Raises:
    ValueError: no probe has its subject in the gallery, or there are no genuine / impostor pairs.
  """
  probe_labels, gallery_labels = np.asarray(probe_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
  scores = cosine_similarity(probe_emb, gallery_emb)
  ranks = subject_ranks(scores, probe_labels, gallery_labels)
  found = ranks[ranks > 0]
  if len(found) == 0:
    raise DataError(f"no probe's subject is in the gallery ({len(probe_labels)} probes, "
                    f"{len(np.unique(gallery_labels))} gallery subjects): check the fold's gallery/probe lists")
  cmc = np.array([np.mean(found <= k) for k in range(1, max_rank + 1)], np.float64)
  genuine, impostor = genuine_impostor(scores, probe_labels, gallery_labels)
  row = {"rank1": 100.0 * float(np.mean(found == 1))}
  for far, key in _FAR_KEYS.items():
    row[key] = 100.0 * verification_rate(genuine, impostor, far)
  row.update({"cmc": cmc.tolist(), "num_query": int(len(probe_labels)), "num_gallery": int(len(gallery_labels)),
              "num_genuine": int(len(genuine)), "num_impostor": int(len(impostor)),
              "num_probe_without_gallery": int(np.count_nonzero(ranks == 0))})
  return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, population std) of per-fold numbers; std is 0 for one fold (`aggregate.mean_std`)."""
  return aggregate.mean_std(values, ddof=0)


def fold_set(name: str, fold: int) -> str:
  """The test-set name of a fold's probe or gallery set: "<name>_<fold>"."""
  return f"{name}_{int(fold)}"


def run_face_setting(source: Any, embeddings_by_set: Mapping[str, np.ndarray], setting: Any, max_rank: int = 20,
                     rerank: Optional[Any] = None) -> dict[str, Any]:
  """Scores a face `Setting` (its trials are folds) in the result layout of `protocols.run_setting`.

  Args:
    source: the DataSource: test sets `<setting.query>_<fold>` (NIR probes), `<setting.gallery>_<fold>` (VIS
      gallery) per fold, train sets of the trained fold.
    embeddings_by_set: test-set name -> float [N, E].
    setting: protocol "face", trials = the folds.
    max_rank: CMC length.
    rerank: must be None (re-ranking is not part of the face protocol).
  Returns:
    {"mean", "std": {"rank1", "vr_far_1", "vr_far_0_1"} over the folds (percent), "per_trial": [{"trial",
    "fold", the fold's `score_fold` numbers, "train_overlap_subjects"}], "cmc_mean", "trials" (the folds),
    "num_query" (first fold), "num_gallery" (per fold), "direction", "gallery_sampling", "query", "gallery",
    "protocol", "shot", "query_cameras", "gallery_cameras"}.
  """
  if rerank is not None:
    raise ConfigError("re-ranking is not part of the face protocol: set config.evals.rerank=False for "
                      f"data source {source.name!r}")
  train_ids = set(source.train_visible.labels.tolist()) | set(source.train_infrared.labels.tolist())
  per_fold = []
  for fold in setting.trials:
    names = fold_set(setting.query, fold), fold_set(setting.gallery, fold)
    for name in names:
      if name not in source.test_sets or name not in embeddings_by_set:
        raise KeyError(f"face setting {setting.name!r}, fold {fold}: needs test set {name!r}; the data source has "
                       f"{sorted(source.test_sets)}, the embeddings {sorted(embeddings_by_set)}")
    q, g = source.test_sets[names[0]], source.test_sets[names[1]]
    row = score_fold(embeddings_by_set[names[0]], q.labels, embeddings_by_set[names[1]], g.labels, max_rank)
    overlap = len((set(q.labels.tolist()) | set(g.labels.tolist())) & train_ids)
    if overlap:
      logging.warning("face protocol, fold %d: %d of its test subjects are training subjects of this model (it was "
                      "trained on another fold); its numbers are not a held-out result", fold, overlap)
    per_fold.append({"trial": int(fold), "fold": int(fold), **row, "train_overlap_subjects": overlap})
  stats = {k: mean_std([f[k] for f in per_fold]) for k in METRICS}
  return {
      "query": setting.query, "gallery": setting.gallery, "protocol": "face", "shot": setting.shot,
      "query_cameras": setting.query_cameras, "gallery_cameras": setting.gallery_cameras,
      "direction": setting.name, "gallery_sampling": setting.family, "trials": [int(t) for t in setting.trials],
      "num_query": per_fold[0]["num_query"], "num_gallery": [f["num_gallery"] for f in per_fold],
      "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
      "cmc_mean": np.mean([f["cmc"] for f in per_fold], axis=0).tolist(),
      "per_trial": per_fold,
  }


def folds_of(config: Any) -> tuple[int, ...]:
  """The folds a run scores: config.evals.face_folds, or () = the trained fold config.data.fold."""
  folds = tuple(int(f) for f in (config.evals.face_folds or (config.data.fold,)))
  if len(set(folds)) != len(folds):
    raise ConfigError(f"config.evals.face_folds={folds} lists a fold twice")
  return folds


def fold_numbers(report: Mapping[str, Any], config: Optional[Any] = None) -> dict[str, dict[int, dict[str, float]]]:
  """Per-setting, per-fold face numbers of one report.

  Args:
    report: an eval-mode report (`results/eval_<name>_step<step>.json`: settings carry "per_trial" with each
      fold), or a training report (`results/<name>.json`: flat rows, one fold only).
    config: the run's config (a `config.json` dict or ConfigDict); needed for a training report, whose rows do
      not name their fold.
  Returns:
    setting name -> {fold: {"rank1", "vr_far_1", "vr_far_0_1"}}.
  """
  out: dict[str, dict[int, dict[str, float]]] = {}
  for name, row in aggregate.report_settings(report).items():
    if "per_trial" in row:
      trials = row["per_trial"]
    else:
      if row.get("trials") != 1:
        raise DataError(f"report {report.get('name')!r}, setting {name!r}: the run scored {row.get('trials')} folds "
                        "and its training report keeps only their mean: use its eval-mode report "
                        "(python main.py --mode=eval ..., results/eval_<name>_step<step>.json)")
      if config is None:
        raise DataError(f"report {report.get('name')!r}, setting {name!r}: a training report does not say its "
                        "fold: keep the run's config.json beside results/ (or use the eval-mode report)")
      evals, data = (config["evals"], config["data"]) if isinstance(config, Mapping) else (config.evals, config.data)
      face_folds = evals["face_folds"] if isinstance(evals, Mapping) else evals.face_folds
      fold = data["fold"] if isinstance(data, Mapping) else data.fold
      trials = [{"trial": int((tuple(face_folds) or (fold,))[0]), **row}]
    for t in trials:
      if not all(k in t for k in METRICS):
        raise DataError(f"report {report.get('name')!r}, setting {name!r}: no face numbers ({', '.join(METRICS)}); "
                        "is it a casia_nir_vis run?")
      out.setdefault(name, {})[int(t["trial"])] = {k: float(t[k]) for k in METRICS}
  return out


def main(argv: Sequence[str]) -> int:
  """`python -m fdnm_jax.evaluation.face [--sample_std] REPORT.json ...`: prints the mean +- std over the reports'
  folds (`aggregate.aggregate`; population std unless --sample_std).

  A training report (`<workdir>/results/<name>.json`) takes its fold from `<workdir>/config.json`.
  """
  ddof = 1 if "--sample_std" in argv else 0
  argv = [a for a in argv if a != "--sample_std"]
  if not argv:
    print("usage: python -m fdnm_jax.evaluation.face [--sample_std] runs/casia_f*/results/<name>.json ...",
          file=sys.stderr)
    return 2
  numbers = []
  for path in argv:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    config = report.get("config")
    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
    if config is None and os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    try:
      numbers.append(fold_numbers(report, config))
    except ValueError as e:
      print(f"{path}: {e}", file=sys.stderr)
      return 1
  try:
    table = aggregate.format_aggregate(aggregate.aggregate(numbers, ddof), key_name="folds")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
