"""Runs ablation rows one after another and writes one Markdown table of their results.

  python launch/ablate.py --dataset=synthetic --workdir=runs/ablations --out=docs/ablations.md \\
      --rows=baseline,agp,anm,anm_cnm,full --set=schedule.num_epochs=10

Each row is `configs/ablations/<row>.py:<dataset>`, trained and evaluated by `main.py` in its own
workdir (`<workdir>/<row>`; an already finished row is only re-evaluated, never retrained). On a cluster,
run the same `main.py` command per row as one job each and call this script with `--collect_only`.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_ROWS = ("baseline", "agp", "anm", "anm_cnm", "full", "agp_at_1", "agp_at_2", "agp_at_3", "agp_at_4",
            "agp_at_1_2", "agp_at_1_2_3")

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "synthetic", "Data-set config the rows change: synthetic, regdb, sysu, llcm, "
                    "casia_nir_vis.")
flags.DEFINE_list("rows", list(ALL_ROWS), "Ablation rows (file names under configs/ablations/).")
flags.DEFINE_string("workdir", "runs/ablations", "Parent folder of the rows' workdirs.")
flags.DEFINE_string("out", None, "Markdown file for the table (default: <workdir>/ablations.md).")
flags.DEFINE_multi_string("set", [], "A config override for every row, e.g. --set=schedule.num_epochs=10.")
flags.DEFINE_bool("collect_only", False, "Do not run anything: only collect the rows' results into the table.")


def load_config(row: str, dataset: str) -> Any:
  """The config of one row as main.py builds it (before command-line overrides, which every row shares)."""
  path = os.path.join(REPO, "configs", "ablations", f"{row}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ablation row {row!r}: {path} does not exist (rows: {', '.join(ALL_ROWS)}).")
  spec = importlib.util.spec_from_file_location(f"ablation_{row}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(dataset)


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


def run_row(row: str, workdir: str) -> float:
  """Trains and evaluates one row with main.py; returns its wall time in seconds."""
  cmd = [sys.executable, os.path.join(REPO, "main.py"),
         f"--config={os.path.join(REPO, 'configs', 'ablations', row + '.py')}:{FLAGS.dataset}",
         f"--workdir={workdir}"] + [f"--config.{s}" for s in FLAGS.set]
  print(f"[{row}] {' '.join(cmd)}", flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"row {row!r} failed (exit {proc.returncode}); its log is above, its workdir {workdir}.")
  return time.perf_counter() - start


def read_report(row: str, workdir: str, name: str) -> dict:
  path = os.path.join(workdir, "results", f"{name}.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"row {row!r} has no results file {path}: run it first (without --collect_only).")
  with open(path) as f:
    return json.load(f)


def markdown_table(rows: list[tuple[str, dict, str]]) -> str:
  """One line per row: Rank-1/10/20, mAP, mINP per protocol setting (face settings: Rank-1, VR@FAR 1 % / 0.1 %;
  percent; mean over trials), params, step time, config diff."""
  settings = list(rows[0][1]["settings"]) if rows else []
  first = next(iter(rows[0][1]["settings"].values()), {}) if rows else {}
  metrics = tuple(m for m in ("rank1", "rank10", "rank20", "mAP", "mINP", "vr_far_1", "vr_far_0_1") if m in first)
  header = ["row"] + [f"{d} {m.replace('rank', 'R')}" for d in settings for m in metrics] + [
      "params (M)", "step (s)", "config diff"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row, report, diff in rows:
    cells = [row] + [f"{report['settings'][d][m]:.2f}" for d in settings for m in metrics]
    step = report.get("train_step_seconds")
    cells += [f"{report['num_params'] / 1e6:.3f}", f"{step:.3f}" if step else "—", diff]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  sys.path.insert(0, REPO)
  base = load_config("baseline", FLAGS.dataset)
  collected = []
  for row in FLAGS.rows:
    config = load_config(row, FLAGS.dataset)  # fails early on a bad row name.
    workdir = os.path.join(os.path.abspath(FLAGS.workdir), row)
    if not FLAGS.collect_only:
      seconds = run_row(row, workdir)
      print(f"[{row}] done in {seconds:.0f} s", flush=True)
    collected.append((row, read_report(row, workdir, config.name), config_diff(config, base)))
  table = markdown_table(collected)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "ablations.md")
  command = "python launch/ablate.py " + " ".join(
      [f"--dataset={FLAGS.dataset}", f"--rows={','.join(FLAGS.rows)}", f"--workdir={FLAGS.workdir}"]
      + [f"--set={s}" for s in FLAGS.set])
  with open(out, "w") as f:
    f.write(f"# Ablations on {FLAGS.dataset}\n\nCommand: `{command}`\n\n{table}\n")
  print(table)
  print(f"\nwritten to {out}")


if __name__ == "__main__":
  app.run(main)
