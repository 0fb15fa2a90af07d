"""Embedding health: numbers that show when test embeddings collapse onto one direction, for every report.

Measured on the README demo with the reference reading of ANM's BatchNorm (issue 19): every test embedding had
cosine 0.9999 to the mean embedding while retrieval still worked in float32, because all distances were squeezed
into ~1e-4 (thresholds, histograms and t-SNE degenerate; a lower-precision path at risk). The numbers here make that
visible in every report:

- `mean_cosine_to_mean(x)`: rows L2-normalised, u = their mean direction (the mean of the normalised rows, itself
  normalised); the mean over rows of cos(row, u). 1 = every row points the same way; about 0 for isotropic rows
  (for n random directions in D dims, |mean| ~ 1/sqrt(n) and the value ~ sqrt(1/n + ...) is small).
- `embedding_health`: that number per part of the embedding (a branch's BNNeck or pooled feature,
  `evaluator.embedding_layout`) and per modality (all test sets of one modality together), and for the whole
  embedding.
- `variance_quantiles`: min, 5 %, median, 95 %, max of a BNNeck's running variance (NumPy's linear quantiles);
  a variance at or below the BN epsilon (1e-5) means its eval-mode output is dominated by the epsilon.
- `warnings`: one line per (part, modality) whose mean cosine exceeds the threshold (`evals.health_max_mean_cosine`,
  0.95), saying what it means and what to try.

Pure NumPy on the host; nothing here imports above `fdnm_jax.evaluation`.
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np

QUANTILES = (("min", 0.0), ("p5", 0.05), ("median", 0.5), ("p95", 0.95), ("max", 1.0))
WHOLE = "embedding"  # the part name of the whole (concatenated) embedding.


def _unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_cosine_to_mean(x: np.ndarray) -> float:
  """Mean cosine of the L2-normalised rows of `x` [N, D] to their normalised mean direction (float64 maths).

  NaN for an empty `x`; 0 when the normalised rows cancel out exactly (no mean direction).
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"mean_cosine_to_mean needs [N, D] rows, got shape {x.shape}")
  if not len(x):
    return float("nan")
  unit = _unit_rows(x)
  mean = unit.mean(axis=0)
  norm = np.linalg.norm(mean)
  if norm == 0.0:
    return 0.0
  return float(np.mean(unit @ (mean / norm)))


def variance_quantiles(var: np.ndarray) -> dict[str, float]:
  """{"min", "p5", "median", "p95", "max"} of the values of `var` (any shape), NumPy's linear quantiles."""
  values = np.asarray(var, np.float64).reshape(-1)
  return {name: float(np.quantile(values, q)) for name, q in QUANTILES}


def bnneck_variance_quantiles(batch_stats: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """`variance_quantiles` of the running variance of every BNNeck module (top-level `bnneck`, `bnneck_part{j}`)
  of an FDNM variables' "batch_stats" tree."""
  return {name: variance_quantiles(stats["var"]) for name, stats in sorted(batch_stats.items())
          if name.startswith("bnneck") and "var" in stats}


def embedding_health(embeddings_by_set: Mapping[str, np.ndarray], modality_by_set: Mapping[str, str],
                     layout: Sequence[tuple[str, int]]) -> dict[str, dict[str, float]]:
  """Mean cosine to the mean embedding, per part of the embedding and per modality.

  Args:
    embeddings_by_set: test-set name -> float [N, E] embeddings (as scored: flip sums included).
    modality_by_set: test-set name -> modality name ("visible", "infrared"); the sets of one modality are pooled.
    layout: the embedding's parts in order, (name, width) with the widths summing to E.
  Returns:
    part name -> {modality: mean cosine}, the parts of `layout` in order, then WHOLE for the whole embedding.
  """
  widths = [w for _, w in layout]
  bounds = np.cumsum([0] + widths)
  out: dict[str, dict[str, float]] = {name: {} for name, _ in layout}
  out[WHOLE] = {}
  for modality in sorted(set(modality_by_set.values())):
    rows = [np.asarray(embeddings_by_set[s]) for s, m in modality_by_set.items() if m == modality]
    x = np.concatenate(rows) if rows else np.zeros((0, bounds[-1]))
    if x.shape[1] != bounds[-1]:
      raise ValueError(f"embeddings of width {x.shape[1]} do not match the layout's {bounds[-1]} ({list(layout)})")
    for (name, _), lo, hi in zip(layout, bounds[:-1], bounds[1:]):
      out[name][modality] = mean_cosine_to_mean(x[:, lo:hi])
    out[WHOLE][modality] = mean_cosine_to_mean(x)
  return out


def warnings(mean_cosine: Mapping[str, Mapping[str, float]], threshold: float) -> list[str]:
  """[] when every mean cosine to the mean embedding is at most `threshold`, else one warning line naming each
  (part, modality) above it with its value, what it means and what to try."""
  above = [f"{part} ({', '.join(f'{m} {v:.5f}' for m, v in by_modality.items() if v > threshold)})"
           for part, by_modality in mean_cosine.items() if any(v > threshold for v in by_modality.values())]
  if not above:
    return []
  return [f"collapsed test embeddings: the mean cosine of the test embeddings to their mean direction is above "
          f"{threshold} for {'; '.join(above)}. The embeddings lie in a narrow cone, so distances differ only in "
          "their last digits (thresholds, histograms and t-SNE are degenerate; lower precision can break the "
          "ranking). Usually the eval-mode BatchNorm statistics do not describe what eval mode feeds them: try "
          "--config.evals.recalibrate_bn_batches=50 (precise BN on un-augmented training batches, saved beside "
          "the checkpoint)."]


def health_report(embeddings_by_set: Mapping[str, np.ndarray], modality_by_set: Mapping[str, str],
                  layout: Sequence[tuple[str, int]], batch_stats: Mapping[str, Any], threshold: float,
                  checkpoint_batch_stats: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """The health section of a report.

  Returns:
    {"mean_cosine_to_mean": `embedding_health`, "bnneck_running_var": `bnneck_variance_quantiles(batch_stats)`
    (the statistics the embeddings were computed with), "bnneck_running_var_checkpoint" (only when
    `checkpoint_batch_stats` is given: the checkpoint's own, before a recalibration), "threshold", "warnings"}.
  """
  cosines = embedding_health(embeddings_by_set, modality_by_set, layout)
  report = {"mean_cosine_to_mean": cosines, "bnneck_running_var": bnneck_variance_quantiles(batch_stats),
            "threshold": float(threshold), "warnings": warnings(cosines, threshold)}
  if checkpoint_batch_stats is not None:
    report["bnneck_running_var_checkpoint"] = bnneck_variance_quantiles(checkpoint_batch_stats)
  return report


def format_markdown(report: Optional[Mapping[str, Any]]) -> str:
  """The health section as Markdown: the warnings (bold), the mean-cosine table, the variance quantiles."""
  if not report:
    return ""
  cosines = report["mean_cosine_to_mean"]
  modalities = sorted({m for v in cosines.values() for m in v})
  lines = ["## Embedding health", ""]
  lines += [f"**WARNING: {w}**" for w in report["warnings"]] + ([""] if report["warnings"] else [])
  lines += ["Mean cosine of each L2-normalised test embedding to the normalised mean embedding (1 = collapsed; "
            f"warning above {report['threshold']}):", "",
            "| part | " + " | ".join(modalities) + " |", "|" + "---|" * (len(modalities) + 1)]
  lines += [f"| {part} | " + " | ".join(f"{v[m]:.5f}" if m in v else "—" for m in modalities) + " |"
            for part, v in cosines.items()]
  for key, title in (("bnneck_running_var", "BNNeck running variance (as scored)"),
                     ("bnneck_running_var_checkpoint", "BNNeck running variance (checkpoint, before recalibration)")):
    if key in report:
      lines += ["", f"{title}:", "", "| module | " + " | ".join(n for n, _ in QUANTILES) + " |",
                "|" + "---|" * (len(QUANTILES) + 1)]
      lines += [f"| {name} | " + " | ".join(f"{q[n]:.3g}" for n, _ in QUANTILES) + " |"
                for name, q in report[key].items()]
  return "\n".join(lines)


def format_recalibration(info: Optional[Mapping[str, Any]]) -> str:
  """One Markdown line saying whether precise BN (`fdnm_jax.precise_bn`) recalibrated the scored statistics."""
  if not info:
    return "- BatchNorm statistics: the checkpoint's running averages (evals.recalibrate_bn_batches=0)."
  if info.get("path"):
    where = f"{'loaded from' if info.get('reused') else 'computed and saved to'} {info['path']}"
  else:
    where = "computed, not saved (no checkpoint step)"
  return (f"- BatchNorm statistics: **recalibrated** (precise BN) on {info['batches']} un-augmented training batches "
          f"({info['images']} images, sampler steps {info['sampler_steps'][0]}..{info['sampler_steps'][1] - 1}, seed "
          f"{info['seed']}, {info['transform']}), {info.get('levels')} levels / {info.get('forward_passes')} forward "
          f"passes; {where}.")
