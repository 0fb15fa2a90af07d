"""Runs ablation rows, each over one or more seeds, and writes one Markdown table of their results.

  python launch/ablate.py --dataset=synthetic --workdir=runs/ablations --out=docs/ablations.md \\
      --rows=baseline,agp,anm,anm_cnm,full --set=schedule.num_epochs=10
  python launch/ablate.py --rows=baseline,full_reference,full,agp,anm --seeds=0,1,2 --single_seed_rows=agp,anm ...

Each row is `configs/ablations/<row>.py:<dataset>`. Each (row, seed) is one `main.py` training run (train, then
score the test protocol) in its own workdir `<workdir>/<row>/trial_<seed>`, with `--config.seed=<seed>` and every
`--set` override: `launch/trials.py`'s runs (`--vary=seed`), so a run this script finished before is only re-read and
an unfinished one is resumed by `main.py`. `--seeds` defaults to the config's own seed; the rows named in
`--single_seed_rows` run only the first of `--seeds` (the rows that decide nothing need not pay for three).
The seed varies the parameter init, the identity sampler and augmentation; the data (e.g. `synthetic.seed`) stays.

The table: per row, the number of seeds, then per protocol setting and metric the mean ± population std (NumPy
ddof=0, `fdnm_jax.evaluation.aggregate`) over the row's seeds (a one-seed row shows its number alone: it has no
spread), the embedding health (mean cosine of the test embeddings to their mean direction, per modality, from the
report's health section), the layer4 map size (from the input size), parameters, median step time and the
model/loss fields that differ from the baseline row; then one line per (row, seed). On a cluster, run each run's
`main.py` command as its own job with that workdir and call this script with `--collect_only`.
"""

import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from fdnm_jax.errors import FdnmError, FlagError  # noqa: E402
from fdnm_jax.evaluation import aggregate, health  # noqa: E402
from launch import trials  # noqa: E402

ROWS_DIR = os.path.join(REPO, "configs", "ablations")
PAPER_ROWS = ("baseline", "agp", "anm", "anm_cnm", "full", "agp_at_1", "agp_at_2", "agp_at_3", "agp_at_4",
              "agp_at_1_2", "agp_at_1_2_3")  # the paper's ablation (Tables III-IV), in its order.
ALL_ROWS = PAPER_ROWS + tuple(sorted(
    f[:-3] for f in os.listdir(ROWS_DIR) if f.endswith(".py") and f != "__init__.py" and f[:-3] not in PAPER_ROWS))
DDOF = 0  # population std, as the protocols' std over gallery trials (aggregate.py).

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined only when the script runs (the tests import this module)."""
  flags.DEFINE_string("dataset", "synthetic", "Data-set config the rows change: synthetic, regdb, sysu, llcm, "
                      "casia_nir_vis.")
  flags.DEFINE_list("rows", list(PAPER_ROWS), "Ablation rows (file names under configs/ablations/).")
  flags.DEFINE_list("seeds", [], "Seeds every row runs (default: the config's seed), e.g. 0,1,2.")
  flags.DEFINE_list("single_seed_rows", [], "Rows (of --rows) that run only the first of --seeds.")
  flags.DEFINE_string("workdir", "runs/ablations", "Parent folder of the runs' workdirs (<workdir>/<row>/trial_<s>).")
  flags.DEFINE_string("out", None, "Markdown file for the table (default: <workdir>/ablations.md).")
  flags.DEFINE_multi_string("set", [], "A config override for every run, e.g. --set=schedule.num_epochs=10.")
  flags.DEFINE_list("metrics", [], "Metrics of the tables (default: every one the reports have), e.g. "
                    "rank1,mAP,mINP.")
  flags.DEFINE_bool("collect_only", False, "Do not run anything: only collect the runs' results into the table.")


def row_config_arg(row: str, dataset: str) -> str:
  """main.py's --config value of one row (relative to the repository)."""
  return f"{os.path.join('configs', 'ablations', row + '.py')}:{dataset}"


def load_config(row: str, dataset: str) -> Any:
  """The config of one row as main.py builds it (before command-line overrides, which every row shares)."""
  path = os.path.join(ROWS_DIR, f"{row}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ablation row {row!r}: {path} does not exist (rows: {', '.join(ALL_ROWS)}).")
  return trials.load_config(row_config_arg(row, dataset))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1} for a ConfigDict or a dict."""
  items = d.items() if hasattr(d, "items") else []
  out = {}
  for k, v in items:
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def config_diff(config: Any, base: Any) -> str:
  """The model/loss fields where `config` differs from `base`, as "field=value" items."""
  a, b = flatten(config), flatten(base)
  keys = [k for k in sorted(a) if k.startswith(("model.", "loss.")) and a[k] != b.get(k)]
  return ", ".join(f"{k.split('.', 1)[1]}={a[k]}" for k in keys) or "—"


def row_seeds(rows: Sequence[str], seeds: Sequence[str], single_seed_rows: Sequence[str], config_seed: int
              ) -> dict[str, tuple[int, ...]]:
  """Row -> the seeds it runs: `seeds` (default: `config_seed`), only the first for `single_seed_rows`.

  Raises:
    FlagError: a seed that is not an integer or given twice, a single-seed row not in `rows`, a row given twice.
  """
  if len(set(rows)) != len(rows):
    raise FlagError(f"--rows={','.join(rows)} names a row twice")
  try:
    values = tuple(int(s) for s in seeds) or (int(config_seed),)
  except ValueError:
    raise FlagError(f"--seeds={','.join(seeds)}: write integers, e.g. --seeds=0,1,2") from None
  if len(set(values)) != len(values):
    raise FlagError(f"--seeds={','.join(seeds)} lists a seed twice")
  unknown = [r for r in single_seed_rows if r not in rows]
  if unknown:
    raise FlagError(f"--single_seed_rows: {', '.join(unknown)} not in --rows={','.join(rows)}")
  return {row: values[:1] if row in single_seed_rows else values for row in rows}


def plan_of(row: str, dataset: str, seeds: Sequence[int], overrides: Sequence[str], workdir: str) -> trials.Plan:
  """The runs of one row: `trials.Plan` over the seeds in `<workdir>/<row>/trial_<seed>`.

  Raises:
    FlagError: an override of the seed (give --seeds) or of a field the config lacks.
  """
  for override in overrides:
    if override.partition("=")[0] == "seed":
      raise FlagError(f"--set={override}: the seed is set per run; give --seeds={override.partition('=')[2]}")
  plan = trials.make_plan(None, row_config_arg(row, dataset), "0", "seed", overrides, os.path.join(workdir, row))
  return trials.Plan(plan.config, "seed", tuple(seeds), plan.overrides, plan.workdir)


def layer4_size(config: Mapping[str, Any]) -> tuple[int, int]:
  """(height, width) of layer4's map for the input size of a config (dict or ConfigDict): the stem conv, the
  max-pool, layer2 and layer3 each halve with rounding up (resnet.py: padded 3x3/7x7 and strided 1x1 convs give
  ceil(H/2)), layer4 too unless model.last_stride=1."""
  sizes = [int(config["input"]["height"]), int(config["input"]["width"])]
  halvings = 4 + (int(config["model"]["last_stride"]) != 1)
  for _ in range(halvings):
    sizes = [math.ceil(s / 2) for s in sizes]
  return sizes[0], sizes[1]


def whole_embedding_cosines(report: Mapping[str, Any]) -> dict[str, float]:
  """Modality -> mean cosine of the whole test embedding to its mean direction ({} for a report without health)."""
  section = report.get("health") or {}
  return dict(section.get("mean_cosine_to_mean", {}).get(health.WHOLE, {}))


def _cell(mean: float, std: float, runs: int, digits: int = 2) -> str:
  """One run: its number; several: mean ± std; none: —."""
  if not runs:
    return "—"
  return f"{mean:.{digits}f}" if runs == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _metric_label(setting: str, metric: str) -> str:
  return f"{setting} {metric.replace('rank', 'R')}"


def _columns(rows: Sequence[tuple[str, Mapping[Any, Mapping[str, Any]], str]], only: Optional[Sequence[str]] = None
             ) -> tuple[list, list, list]:
  """The settings and metrics (those of `only`, if given) of the first row's first report, and the modalities of
  every report's health."""
  first = next(iter(rows[0][1].values())) if rows else {"settings": {}}
  settings = list(aggregate.report_settings(first)) if rows else []
  metrics = list(aggregate.row_values(first["settings"][settings[0]])) if settings else []
  metrics = [m for m in metrics if not only or m in only]
  modalities = sorted({m for _, reports, _ in rows for r in reports.values() for m in whole_embedding_cosines(r)})
  return settings, metrics, modalities


def markdown_table(rows: Sequence[tuple[str, Any, str]], layer4: Optional[Mapping[str, str]] = None,
                   metrics: Optional[Sequence[str]] = None) -> str:
  """One line per row: the number of seeds, Rank-1/10/20, mAP, mINP per protocol setting (face settings: Rank-1,
  VR@FAR 1 % / 0.1 %; percent; mean ± population std over the seeds, a one-seed row its number alone), the mean
  cosine of the whole test embedding to its mean direction per modality, the layer4 map (when given), params,
  median step time (mean over the seeds), config diff.

  Args:
    rows: (row name, {seed: report} or a single report, config diff); a report is a results/<name>.json.
    layer4: row name -> its layer4 map size, e.g. "8x4" (optional column).
    metrics: the metrics shown (default: every one of aggregate.METRICS the first report has).
  """
  rows = [(name, reports if "settings" not in reports else {0: reports}, diff) for name, reports, diff in rows]
  settings, metrics, modalities = _columns(rows, metrics)
  header = (["row", "seeds"] + [_metric_label(d, m) for d in settings for m in metrics]
            + [f"emb. cos {m}" for m in modalities] + (["layer4"] if layer4 else [])
            + ["params (M)", "step (s)", "config diff"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, reports, diff in rows:
    per_run = aggregate.aggregate([aggregate.run_numbers(r, seed) for seed, r in reports.items()], DDOF)
    cells = [name, str(len(reports))]
    for d in settings:
      numbers = per_run.get(d, {"metrics": (), "keys": ()})
      cells += [_cell(numbers["mean"][m], numbers["std"][m], len(numbers["keys"])) if m in numbers["metrics"]
                else "—" for m in metrics]
    cosines = [whole_embedding_cosines(r) for r in reports.values()]
    for m in modalities:
      values = [c[m] for c in cosines if m in c]
      cells.append(_cell(*aggregate.mean_std(values, DDOF), len(values), 4) if values else "—")
    cells += [layer4[name]] if layer4 else []
    params = {r["num_params"] for r in reports.values()}
    steps = [r["train_step_seconds"] for r in reports.values() if r.get("train_step_seconds")]
    cells += [" / ".join(f"{p / 1e6:.3f}" for p in sorted(params)),
              f"{sum(steps) / len(steps):.3f}" if steps else "—", diff]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_seed_table(rows: Sequence[tuple[str, Mapping[int, Mapping[str, Any]], str]],
                   seconds: Optional[Mapping[tuple[str, int], float]] = None,
                   metrics: Optional[Sequence[str]] = None) -> str:
  """One line per (row, seed): that run's numbers (`metrics`, as `markdown_table`), its embedding health, its
  median step time and (when given) its wall time in seconds."""
  settings, metrics, modalities = _columns(rows, metrics)
  header = (["row", "seed"] + [_metric_label(d, m) for d in settings for m in metrics]
            + [f"emb. cos {m}" for m in modalities] + ["step (s)"] + (["wall (s)"] if seconds else []))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, reports, _ in rows:
    for seed, report in sorted(reports.items()):
      values = {d: aggregate.row_values(report["settings"][d]) for d in settings}
      cells = [name, str(seed)] + [f"{values[d][m]:.2f}" if m in values[d] else "—"
                                   for d in settings for m in metrics]
      cos = whole_embedding_cosines(report)
      cells += [f"{cos[m]:.4f}" if m in cos else "—" for m in modalities]
      step = report.get("train_step_seconds")
      cells += [f"{step:.3f}" if step else "—"]
      if seconds:
        wall = seconds.get((name, seed))
        cells += [f"{wall:.0f}" if wall is not None else "—"]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _run_seconds(trial: trials.Trial) -> Optional[float]:
  """The wall time this script recorded for a run (its trials.MARKER), or None."""
  path = os.path.join(trial.workdir, trials.MARKER)
  return trials._read_json(path).get("seconds") if os.path.isfile(path) else None


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    unknown = [m for m in FLAGS.metrics if m not in aggregate.METRICS]
    if unknown:
      raise FlagError(f"--metrics: {', '.join(unknown)} unknown; use some of {', '.join(aggregate.METRICS)}")
    base = load_config("baseline", FLAGS.dataset)
    configs = {row: load_config(row, FLAGS.dataset) for row in FLAGS.rows}  # fails early on a bad row name.
    seeds = row_seeds(FLAGS.rows, FLAGS.seeds, FLAGS.single_seed_rows, base.seed)
    workdir = os.path.abspath(FLAGS.workdir)
    plans = {row: plan_of(row, FLAGS.dataset, seeds[row], FLAGS.set, workdir) for row in FLAGS.rows}
    collected, layer4, seconds = [], {}, {}
    for row in FLAGS.rows:
      runs = trials.collect(plans[row], run=not FLAGS.collect_only)
      collected.append((row, {t.value: t.report for t in runs}, config_diff(configs[row], base)))
      layer4[row] = " / ".join(sorted({"x".join(map(str, layer4_size(t.config))) for t in runs}))
      seconds.update({(row, t.value): _run_seconds(t) for t in runs})
  except FdnmError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  command = "python launch/ablate.py " + " ".join(
      [f"--dataset={FLAGS.dataset}", f"--rows={','.join(FLAGS.rows)}", f"--workdir={FLAGS.workdir}"]
      + ([f"--seeds={','.join(FLAGS.seeds)}"] if FLAGS.seeds else [])
      + ([f"--single_seed_rows={','.join(FLAGS.single_seed_rows)}"] if FLAGS.single_seed_rows else [])
      + ([f"--metrics={','.join(FLAGS.metrics)}"] if FLAGS.metrics else [])
      + [f"--set={s}" for s in FLAGS.set])
  table = markdown_table(collected, layer4, FLAGS.metrics)
  runs = per_seed_table(collected, {k: v for k, v in seconds.items() if v is not None}, FLAGS.metrics)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "ablations.md")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(f"# Ablations on {FLAGS.dataset}\n\nCommand: `{command}`\n\nCells: percent, mean ± "
            f"{aggregate.STD_NAMES[DDOF]} over the row's seeds (a one-seed row: its number).\n\n{table}\n\n"
            f"## Per seed\n\n{runs}\n")
  print(table)
  print(f"\nwritten to {out}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
