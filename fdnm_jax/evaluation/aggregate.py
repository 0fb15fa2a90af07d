"""Mean +- std of test numbers over repeated runs of one experiment: RegDB's 10 splits, CASIA NIR-VIS 2.0's 10 folds,
the seeds of any config.

A run is one training run (one workdir). Its report (`results/<name>.json`, or an eval-mode report) gives, per
protocol setting (a direction, a SYSU-MM01 search mode), the test numbers; where the protocol has trials of its own
(SYSU-MM01's and LLCM's 10 gallery draws) the report's number is their mean, and that mean is the run's number.
`run_numbers(report, key)` takes one run's numbers under its key (the value of the field the runs vary: the split,
the fold, the seed), `aggregate` combines the runs of each setting into mean and std per metric, keeping the per-run
values, and `format_aggregate` / `format_per_run` write the Markdown tables. `report_settings` is the one place that
knows where a report keeps its test-protocol numbers.

std: the population std (NumPy's ddof=0) by default, as the protocols' std over gallery trials here; ddof=1 (the
sample std, of a mean over few runs) on request. Every table says which, and over how many runs.
All numbers are percent.
"""

import math
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np

from fdnm_jax.errors import DataError

# Report keys aggregated when a setting has them (ReID: Rank-k, mAP, mINP; faces: Rank-1, VR@FAR), in table order.
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "vr_far_1", "vr_far_0_1")
LABELS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "rank20": "Rank-20", "mAP": "mAP",
          "mINP": "mINP", "vr_far_1": "VR@FAR=1%", "vr_far_0_1": "VR@FAR=0.1%"}
STD_NAMES = {0: "population std (ddof=0)", 1: "sample std (ddof=1)"}


def report_settings(report: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
  """The test-protocol numbers of a report: setting name -> its row (`report["settings"]`).

  Raises:
    DataError: the report has no settings.
  """
  settings = report.get("settings")
  if not isinstance(settings, Mapping) or not settings:
    raise DataError(f"report {report.get('name')!r} has no 'settings' (per protocol setting numbers): is it a "
                    "results/<name>.json or eval-mode report of fdnm-jax?")
  return settings


def report_reranked(report: Mapping[str, Any]) -> bool:
  """Whether a report's numbers are re-ranked (eval-mode reports say so; training reports never are)."""
  rerank = report.get("rerank")
  return bool(rerank.get("enabled")) if isinstance(rerank, Mapping) else False


def row_values(row: Mapping[str, Any]) -> dict[str, float]:
  """The METRICS of one setting's row: a training report's flat row, or an eval-mode row's "mean" section."""
  source = row["mean"] if isinstance(row.get("mean"), Mapping) else row
  return {m: float(source[m]) for m in METRICS if isinstance(source.get(m), (int, float))}


def run_numbers(report: Mapping[str, Any], key: Hashable) -> dict[str, dict[Hashable, dict[str, float]]]:
  """One run's numbers: setting name -> {key: {metric: value}}.

  Raises:
    DataError: a setting without any of METRICS.
  """
  out = {}
  for name, row in report_settings(report).items():
    values = row_values(row)
    if not values:
      raise DataError(f"report {report.get('name')!r}, setting {name!r}: none of {', '.join(METRICS)}")
    out[name] = {key: values}
  return out


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
  """(mean, std with `ddof`) of per-run numbers; the std is 0 for one run with ddof=0, NaN with ddof=1."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=ddof)) if len(values) > ddof else math.nan
  return float(np.mean(values)), std


def aggregate(per_run: Sequence[Mapping[str, Mapping[Hashable, Mapping[str, float]]]], ddof: int = 0
              ) -> dict[str, dict[str, Any]]:
  """Mean and std over the runs of each setting (see the module docstring).

  Args:
    per_run: `run_numbers` (or `face.fold_numbers`) of each report; one report may hold several keys.
    ddof: 0 (population std) or 1 (sample std).
  Returns:
    setting name -> {"keys": sorted run keys, "metrics": the METRICS every run of the setting has, "mean",
    "std": {metric}, "per_run": {key: {metric}}, "ddof"}.
  Raises:
    DataError: nothing to aggregate, or one key scored by two reports.
  """
  if ddof not in STD_NAMES:
    raise ValueError(f"ddof={ddof}: use 0 (population std) or 1 (sample std)")
  merged: dict[str, dict[Hashable, Mapping[str, float]]] = {}
  for numbers in per_run:
    for name, runs in numbers.items():
      for key, values in runs.items():
        if key in merged.setdefault(name, {}):
          raise DataError(f"setting {name!r}: {key} is scored by more than one report")
        merged[name][key] = values
  if not merged:
    raise DataError("aggregate: no numbers to aggregate")
  out = {}
  for name, runs in merged.items():
    keys = sorted(runs)
    metrics = [m for m in METRICS if all(m in runs[k] for k in keys)]
    stats = {m: mean_std([runs[k][m] for k in keys], ddof) for m in metrics}
    out[name] = {"keys": keys, "metrics": metrics, "mean": {m: v[0] for m, v in stats.items()},
                 "std": {m: v[1] for m, v in stats.items()},
                 "per_run": {k: {m: float(runs[k][m]) for m in metrics} for k in keys}, "ddof": ddof}
  return out


def _cell(mean: float, std: float) -> str:
  return f"{mean:.2f} ± {'n/a' if math.isnan(std) else f'{std:.2f}'}"


def _metrics(aggregated: Mapping[str, Mapping[str, Any]]) -> list[str]:
  return [m for m in METRICS if any(m in r["metrics"] for r in aggregated.values())]


def format_aggregate(aggregated: Mapping[str, Mapping[str, Any]], key_name: str = "run") -> str:
  """Markdown: one row per setting, "mean ± std" per metric, the runs' keys; the header names the std."""
  metrics = _metrics(aggregated)
  ddofs = {r["ddof"] for r in aggregated.values()}
  std = " / ".join(STD_NAMES[d] for d in sorted(ddofs))
  lines = [f"| setting | {key_name} | runs (cells: mean ± {std}) | " + " | ".join(LABELS[m] for m in metrics) + " |",
           "|" + "---|" * (len(metrics) + 3)]
  for name, r in aggregated.items():
    cells = [_cell(r["mean"][m], r["std"][m]) if m in r["metrics"] else "—" for m in metrics]
    lines.append(f"| {name} | {','.join(str(k) for k in r['keys'])} | {len(r['keys'])} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def format_per_run(aggregated: Mapping[str, Mapping[str, Any]], key_name: str = "run",
                   extra: Optional[Mapping[Hashable, Mapping[str, Any]]] = None) -> str:
  """Markdown: one row per (setting, run) with the run's numbers; `extra` adds columns per run key (e.g. "step")."""
  metrics = _metrics(aggregated)
  columns = list(next(iter(extra.values())).keys()) if extra else []
  lines = [f"| setting | {key_name} | " + " | ".join(columns + [LABELS[m] for m in metrics]) + " |",
           "|" + "---|" * (len(metrics) + len(columns) + 2)]
  for name, r in aggregated.items():
    for key in r["keys"]:
      cells = [str(extra[key][c]) for c in columns] if extra else []
      cells += [f"{r['per_run'][key][m]:.2f}" if m in r["per_run"][key] else "—" for m in metrics]
      lines.append(f"| {name} | {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
