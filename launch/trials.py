"""Runs a protocol's repeated trials as one command and writes one table: mean +- std over them, beside the published
numbers.

  python launch/trials.py --dataset=regdb --trials=1-10 --workdir=runs/regdb \\
      --set=data.root=/data/RegDB --set=model.pretrained=/weights/resnet50.npz
  python launch/trials.py --dataset=casia_nir_vis --trials=1-10 --workdir=runs/casia --set=data.root=...
  python launch/trials.py --dataset=sysu --trials=0-4 --vary=seed --workdir=runs/sysu_seeds --set=data.root=...
  python launch/trials.py --dataset=regdb --trials=1-10 --workdir=runs/regdb --collect_only

Trial t is one `main.py` training run (train, then score the test protocol) in `<workdir>/trial_<t>`, with
`--config.<vary>=t` and every `--set` override: RegDB's split (`--vary=data.trial`, the default for regdb), CASIA
NIR-VIS 2.0's fold (`data.fold`, the default for casia_nir_vis) or the seed (`seed`, the default for the others) of
any config (`--config=configs/ablations/full.py:regdb` instead of `--dataset`). The trials run one after another
here; a trial this script finished before (its `trial.json` records the command) is only re-read, and one it did not
finish is resumed by `main.py`. On a cluster, run each trial's command (printed with `--dry_run`) as its own job
with the workdir `<workdir>/trial_<t>` and collect them with `--collect_only`.

The table (`<workdir>/trials.md`, the numbers also in `trials.json`): per protocol setting (direction) and metric
(Rank-1/5/10/20, mAP, mINP; faces: Rank-1, VR@FAR), the mean +- std over the trials (population std unless
`--std=sample`, said in the header), then each trial's numbers with its step and initialisation, then the quoted
published numbers of the data set (docs/published_results.md; re-ranked ones apart). The numbers are each trial's
`results/<name>.json` (SYSU-MM01 and LLCM: already the mean over their 10 gallery draws).
"""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from fdnm_jax.errors import DataError, FdnmError, FlagError, MissingFileError  # noqa: E402
from fdnm_jax.evaluation import aggregate, published  # noqa: E402

MARKER = "trial.json"  # written into a trial's workdir when this script finished it.
DEFAULT_VARY = {"regdb": "data.trial", "casia_nir_vis": "data.fold"}  # otherwise "seed".
STD = {"population": 0, "sample": 1}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags, defined only when the script runs (so importing it, as launch/ablate.py is imported by
  the tests too, defines no flag twice)."""
  flags.DEFINE_string("dataset", None, "Data-set config configs/<dataset>.py: regdb, sysu, llcm, casia_nir_vis, "
                      "synthetic (or give --config).")
  flags.DEFINE_string("config", None, "A config file (path[:arg], as main.py's --config) instead of --dataset.")
  flags.DEFINE_string("trials", None, "The values of the varied field: '1-10', '1,3,5', '0-4'.")
  flags.DEFINE_string("vary", None, "The config field each trial sets: data.trial (default for regdb), data.fold "
                      "(casia_nir_vis), seed (the others).")
  flags.DEFINE_string("workdir", None, "Parent folder of the trials' workdirs (<workdir>/trial_<t>).")
  flags.DEFINE_multi_string("set", [], "A config override for every trial, e.g. --set=data.root=/data/RegDB.")
  flags.DEFINE_bool("collect_only", False, "Run nothing: read the finished trials' reports into the table.")
  flags.DEFINE_bool("dry_run", False, "Print each trial's main.py command and exit.")
  flags.DEFINE_enum("std", "population", list(STD), "The std of the table: population (NumPy ddof=0) or sample "
                    "(ddof=1).")
  flags.DEFINE_string("out", None, "Markdown file of the table (default <workdir>/trials.md).")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the trials are: the config argument, the varied field and its values, the shared overrides, where."""
  config: str  # main.py's --config value (path[:arg]).
  vary: str  # dotted config field set per trial.
  values: tuple[int, ...]
  overrides: tuple[str, ...]  # "field=value" for every trial.
  workdir: str  # parent folder (absolute).

  def trial_dir(self, value: int) -> str:
    return os.path.join(self.workdir, f"trial_{value}")

  def command(self, value: int) -> list[str]:
    """The main.py command of one trial."""
    return ([sys.executable, os.path.join(REPO, "main.py"), f"--config={self.config}",
             f"--workdir={self.trial_dir(value)}", f"--config.{self.vary}={value}"]
            + [f"--config.{o}" for o in self.overrides])

  def record(self, value: int) -> dict[str, Any]:
    """What a trial's marker must say for the trial to count as this plan's."""
    return {"config": self.config, "vary": self.vary, "value": value, "overrides": list(self.overrides)}


def parse_trials(spec: str) -> tuple[int, ...]:
  """'1-3,5' -> (1, 2, 3, 5): comma-separated integers and inclusive ranges, each value once."""
  values: list[int] = []
  for part in (p.strip() for p in (spec or "").split(",")):
    match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
    if not match:
      raise FlagError(f"--trials={spec!r}: write integers and ranges, e.g. '1-10' or '1,3,5' (got {part!r})")
    lo, hi = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
    if hi < lo:
      raise FlagError(f"--trials={spec!r}: the range {part!r} is empty; write it low-high")
    values.extend(range(lo, hi + 1))
  if len(set(values)) != len(values):
    raise FlagError(f"--trials={spec!r} lists a value twice")
  return tuple(values)


def load_config(config_arg: str) -> Any:
  """The ConfigDict of a config file argument `path[:arg]` (relative paths from the repository), as main.py loads
  it before its command-line overrides."""
  path, _, arg = config_arg.partition(":")
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(full):
    raise MissingFileError(f"config file {full} not found: give --dataset=<one of configs/*.py> or --config=<path>")
  spec = importlib.util.spec_from_file_location(f"trials_config_{abs(hash(full))}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _has_field(config: Any, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def make_plan(dataset: Optional[str], config_arg: Optional[str], trials: str, vary: Optional[str],
              overrides: Sequence[str], workdir: str) -> Plan:
  """Checks the flags (the config loads, the varied and overridden fields exist) and returns the plan."""
  if bool(dataset) == bool(config_arg):
    raise FlagError("give one of --dataset (configs/<dataset>.py) or --config (a config file)")
  if not workdir:
    raise FlagError("--workdir is required: the parent folder of the trials' workdirs")
  config_arg = config_arg or os.path.join("configs", f"{dataset}.py")
  config = load_config(config_arg)
  vary = vary or DEFAULT_VARY.get(config.dataset, "seed")
  if not _has_field(config, vary):
    raise FlagError(f"--vary={vary}: the config has no field {vary} (e.g. data.trial, data.fold, seed)")
  for override in overrides:
    field, sep, _ = override.partition("=")
    if not sep or not _has_field(config, field):
      raise FlagError(f"--set={override}: write field=value with a field of the config (e.g. data.root=/data)")
    if field == vary:
      raise FlagError(f"--set={override}: {vary} is the field the trials vary (--trials)")
  return Plan(config_arg, vary, parse_trials(trials), tuple(overrides), os.path.abspath(workdir))


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _field(config: dict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def is_finished(plan: Plan, value: int) -> bool:
  """Whether this script finished trial `value` of `plan` before (its marker and report exist).

  Raises:
    FlagError: the trial's marker records another command (config, overrides): the table would mix two runs.
  """
  path = os.path.join(plan.trial_dir(value), MARKER)
  if not os.path.isfile(path):
    return False
  recorded = _read_json(path)
  expected = plan.record(value)
  differ = [k for k in expected if recorded.get(k) != expected[k]]
  if differ:
    said = "; ".join(f"{k}: {recorded.get(k)!r} there, {expected[k]!r} now" for k in differ)
    raise FlagError(f"{plan.trial_dir(value)} was run with another command ({said}): give another --workdir, or "
                    "remove that trial's folder to train it again")
  return os.path.isfile(os.path.join(plan.trial_dir(value), recorded["report"]))


def run_trial(plan: Plan, value: int, env: Optional[dict] = None,
              launch: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
  """Trains and scores trial `value` with main.py (resuming its workdir), then writes its marker.

  Raises:
    FdnmError: main.py failed (its log is above); the finished trials keep their workdirs.
  """
  command = plan.command(value)
  print(f"[trial {value}] {' '.join(command)}", flush=True)
  start = time.perf_counter()
  proc = launch(command, cwd=REPO, env=env)
  if proc.returncode != 0:
    raise FdnmError(f"trial {value} failed (main.py exit {proc.returncode}; its log is above, its workdir "
                    f"{plan.trial_dir(value)}); the finished trials are kept: run the same command again to go on")
  config = _read_json(os.path.join(plan.trial_dir(value), "config.json"))
  report = os.path.join("results", f"{config['name']}.json")
  step = _read_json(os.path.join(plan.trial_dir(value), report)).get("step")
  marker = dict(plan.record(value), report=report, step=step, seconds=round(time.perf_counter() - start, 1))
  with open(os.path.join(plan.trial_dir(value), MARKER), "w", encoding="utf-8") as f:
    json.dump(marker, f, indent=2)
  print(f"[trial {value}] done in {marker['seconds']:.0f} s", flush=True)


def init_label(config: dict) -> str:
  """How a trial's network was initialised, from its config.json."""
  weights = config.get("model", {}).get("pretrained", "")
  if weights in ("", "none"):
    return "from scratch (random init)"
  return f"ImageNet ({os.path.basename(weights)})"


@dataclasses.dataclass
class Trial:
  """One finished trial as read back: its key, workdir, config.json and report."""
  value: int
  workdir: str
  config: dict
  report: dict


def read_trial(plan: Plan, value: int) -> Trial:
  """Reads a finished trial's config.json and results/<name>.json, checking it is the trial it should be.

  Raises:
    MissingFileError: the trial has no config.json or report (not run, or not finished).
    DataError: its config.json sets the varied field to another value.
  """
  workdir = plan.trial_dir(value)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise MissingFileError(f"trial {value}: no {config_path}: run the trial (without --collect_only, or its main.py "
                           f"command with --workdir={workdir}), or point --workdir at the folder of its trial_<t>/")
  config = _read_json(config_path)
  if _field(config, plan.vary) != value:
    raise DataError(f"{config_path} has {plan.vary}={_field(config, plan.vary)!r}, not {value}: that workdir is "
                    f"another trial's; each trial t needs its own {plan.workdir}/trial_<t>")
  report_path = os.path.join(workdir, "results", f"{config['name']}.json")
  if not os.path.isfile(report_path):
    raise MissingFileError(f"trial {value}: no report {report_path}: the run has not finished; run it again (it "
                           "resumes from its checkpoint)")
  return Trial(value, workdir, config, _read_json(report_path))


def summarize(plan: Plan, trials: Sequence[Trial], ddof: int) -> dict[str, Any]:
  """The numbers of the table: the aggregate, each trial's step and initialisation, the data set, re-ranking."""
  datasets = {t.config["dataset"] for t in trials}
  if len(datasets) != 1:
    raise DataError(f"the trials are of different data sets ({sorted(datasets)}): one table per experiment")
  reranked = {aggregate.report_reranked(t.report) for t in trials}
  if len(reranked) != 1:
    raise DataError("some trials' numbers are re-ranked and some not: they cannot be averaged together")
  numbers = aggregate.aggregate([aggregate.run_numbers(t.report, t.value) for t in trials], ddof)
  runs = {t.value: {"step": t.report.get("step"), "init": init_label(t.config)} for t in trials}
  return {"dataset": datasets.pop(), "vary": plan.vary, "values": list(plan.values), "config": plan.config,
          "overrides": list(plan.overrides), "ddof": ddof, "reranked": reranked.pop(), "aggregate": numbers,
          "runs": runs, "workdirs": {t.value: t.workdir for t in trials}}


def format_table(summary: dict[str, Any], command: str) -> str:
  """The Markdown of `summarize`: header, mean +- std table, per-trial table, published numbers."""
  n = len(summary["values"])
  std = aggregate.STD_NAMES[summary["ddof"]]
  inits = sorted({r["init"] for r in summary["runs"].values()})
  lines = [f"# {summary['dataset']}: {n} trials over {summary['vary']} = "
           f"{','.join(str(v) for v in summary['values'])}", "",
           f"Command: `{command}`", "",
           f"- config: {summary['config']}; overrides: {' '.join(summary['overrides']) or 'none'}",
           f"- initialisation: {' / '.join(inits)}",
           f"- numbers: percent, each trial's results/<name>.json (test protocol); mean ± {std} over the {n} trials; "
           f"{'re-ranked' if summary['reranked'] else 'not re-ranked'}", "",
           f"## Mean ± std over {summary['vary']}", "",
           aggregate.format_aggregate(summary["aggregate"], key_name=summary["vary"]), "",
           "## Per trial", "",
           aggregate.format_per_run(summary["aggregate"], key_name=summary["vary"], extra=summary["runs"]), "",
           published.format_published(summary["dataset"], list(summary["aggregate"]),
                                      reranked=summary["reranked"]), ""]
  return "\n".join(lines)


def collect(plan: Plan, run: bool, env: Optional[dict] = None,
            launch: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[Trial]:
  """Runs (when `run`) each trial that is not finished, then reads every trial back."""
  if run:
    for value in plan.values:
      if is_finished(plan, value):
        print(f"[trial {value}] finished before: only re-read ({plan.trial_dir(value)})", flush=True)
      else:
        run_trial(plan, value, env, launch)
  return [read_trial(plan, value) for value in plan.values]


def write_outputs(summary: dict[str, Any], table: str, out: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(table)
  with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, sort_keys=True)


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if not FLAGS.trials:
      raise FlagError("--trials is required, e.g. --trials=1-10")
    plan = make_plan(FLAGS.dataset, FLAGS.config, FLAGS.trials, FLAGS.vary, FLAGS.set, FLAGS.workdir)
    if FLAGS.dry_run:
      for value in plan.values:
        print(" ".join(plan.command(value)))
      return 0
    trials = collect(plan, run=not FLAGS.collect_only)
    summary = summarize(plan, trials, STD[FLAGS.std])
    command = "python launch/trials.py " + " ".join(a for a in sys.argv[1:])
    table = format_table(summary, command)
    out = FLAGS.out or os.path.join(plan.workdir, "trials.md")
    write_outputs(summary, table, out)
  except FdnmError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(table)
  print(f"\nwritten to {out} (numbers: {os.path.splitext(out)[0]}.json)")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
