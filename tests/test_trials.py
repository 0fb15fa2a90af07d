"""launch/trials.py: RegDB's splits trained and scored as one command (two tiny splits of a RegDB-layout fixture, one
step each), the table's mean +- std against NumPy over the per-split reports, finished trials only re-read,
--collect_only, and the errors that keep two experiments from mixing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fdnm_jax.errors import DataError, FlagError, MissingFileError
from input_pipeline.datasets import synthetic
from launch import trials
from tests import subprocesses

# Under `--dist loadgroup` (.ci/run) this module stays on one xdist worker, so its module fixtures (trained
# runs) are built once, not once per worker.
pytestmark = pytest.mark.xdist_group(__name__)

# tests/input_pipeline/test_tfds_builders.py's tiny model and batch, one step per trial.
TINY = ("input.height=32", "input.width=16", "input.pad=2", "input.num_ids_per_batch=2", "input.num_instances=2",
        "input.eval_batch_size=16", "model.stage_sizes=(1,1,1,1)", "model.width=8", "schedule.num_epochs=1",
        "schedule.steps_per_epoch=1", "schedule.warmup_epochs=1", "schedule.decay_epochs=(1,)",
        "checkpoint.async_save=False", "logging.every_steps=1")
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
SPLITS = (1, 3)  # two splits (each a main.py run) are enough for a mean and a std; 3 leaves a gap in the list.


@pytest.fixture(scope="module")
def regdb_root(tmp_path_factory) -> str:
  """A RegDB-layout tree (Visible/, Thermal/, idx/ with splits 1..10): 4 train + 3 test ids, 2 images each."""
  return synthetic.generate(str(tmp_path_factory.mktemp("regdb") / "RegDB"), num_train_ids=4, num_test_ids=3,
                            images_per_id=2, num_cameras=2, height=32, width=16, seed=0)


def _overrides(root: str) -> tuple[str, ...]:
  # pretrained=none: the RegDB config's from-scratch choice, said explicitly (configs refuse a fresh run without it).
  return (f"data.root={root}", "model.pretrained=none") + TINY


@pytest.fixture(scope="module")
def finished(regdb_root, tmp_path_factory):
  """The runner, as a user starts it, over splits 1 and 3: (workdir, its stdout)."""
  workdir = str(tmp_path_factory.mktemp("trials") / "regdb")
  cmd = [sys.executable, os.path.join(subprocesses.REPO, "launch", "trials.py"), "--dataset=regdb", "--trials=1,3",
         f"--workdir={workdir}"] + [f"--set={o}" for o in _overrides(regdb_root)]
  proc = subprocess.run(cmd, cwd=subprocesses.REPO, env=subprocesses.env(devices=1), capture_output=True, text=True,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc.stdout


def _plan(workdir: str, root: str, **kwargs) -> trials.Plan:
  args = dict(dataset="regdb", config_arg=None, trials="1,3", vary=None, overrides=_overrides(root), workdir=workdir)
  args.update(kwargs)
  return trials.make_plan(**args)


def _reports(workdir: str) -> dict[int, dict]:
  out = {}
  for t in SPLITS:
    with open(os.path.join(workdir, f"trial_{t}", "results", "regdb.json")) as f:
      out[t] = json.load(f)
  return out


@pytest.mark.slow
def test_two_splits_one_table_equal_to_numpy_over_the_reports(finished):
  workdir, stdout = finished
  for t in SPLITS:
    with open(os.path.join(workdir, f"trial_{t}", "config.json")) as f:
      config = json.load(f)
    assert config["data"]["trial"] == t and config["dataset"] == "regdb"
  reports = _reports(workdir)
  assert {r["step"] for r in reports.values()} == {1}
  with open(os.path.join(workdir, "trials.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "trials.md")) as f:
    table = f.read()
  assert table.strip() in stdout
  assert "population std (ddof=0)" in table and "from scratch" in table
  assert set(summary["aggregate"]) == {"visible_to_infrared", "infrared_to_visible"}
  # The aggregate's mean and std are float64 sums of two percentages (<= 100) read back from the reports' JSON: a few
  # float64 roundings, < 1e-12 in either summation order; 1e-9 is far above that and far below the table's 0.01.
  for setting, agg in summary["aggregate"].items():
    assert agg["keys"] == list(SPLITS)
    for m in METRICS:
      values = np.array([reports[t]["settings"][setting][m] for t in SPLITS], np.float64)
      assert agg["mean"][m] == pytest.approx(values.mean(), abs=1e-9)
      assert agg["std"][m] == pytest.approx(values.std(), abs=1e-9)
      assert f"{values.mean():.2f} ± {values.std():.2f}" in table
      for t, v in zip(SPLITS, values):
        assert agg["per_run"][str(t)][m] == v  # each split's own number, as its report holds it.
    # the per-split row of split 3: its step, its initialisation, its numbers.
    row3 = " | ".join(f"{reports[3]['settings'][setting][m]:.2f}" for m in METRICS)
    assert f"| {setting} | 3 | 1 | from scratch (random init) | {row3} |" in table
  # the published RegDB rows beside ours: plain ones comparable, re-ranked ones apart and labelled.
  quoted = table.split("## Published (quoted, not measured)")[1]
  comparable, reranked = quoted.split("### ")
  assert "| visible_to_infrared | DEEN (quoted) | 91.10 | 85.10 |" in comparable
  assert "| infrared_to_visible | MUN (quoted) | 91.86 | 85.01 |" in comparable
  assert reranked.startswith("Re-ranked: NOT comparable") and "| visible_to_infrared | IDKL (quoted, re-ranked) |" \
      in reranked and "IDKL" not in comparable


@pytest.mark.slow
def test_finished_trials_are_only_reread(finished, regdb_root):
  workdir, _ = finished
  mtimes = {t: os.path.getmtime(os.path.join(workdir, f"trial_{t}", "results", "regdb.json")) for t in SPLITS}

  def no_launch(*args, **kwargs):
    raise AssertionError(f"main.py was started for a finished trial: {args}")

  plan = _plan(workdir, regdb_root)
  read = trials.collect(plan, run=True, launch=no_launch)
  assert [t.value for t in read] == list(SPLITS)
  assert mtimes == {t: os.path.getmtime(os.path.join(workdir, f"trial_{t}", "results", "regdb.json")) for t in SPLITS}
  # a different command on the same workdirs would mix two experiments: refused, naming what differs.
  other = _plan(workdir, regdb_root, overrides=_overrides(regdb_root) + ("loss.cnm_weight=0.0",))
  with pytest.raises(FlagError, match=r"trial_1 was run with another command \(overrides:.*loss.cnm_weight"):
    trials.collect(other, run=True, launch=no_launch)


@pytest.mark.slow
def test_collect_only_and_the_sample_std(finished, regdb_root):
  workdir, _ = finished
  plan = _plan(workdir, regdb_root, trials="1,3")
  summary = trials.summarize(plan, trials.collect(plan, run=False), ddof=1)
  reports = _reports(workdir)
  for setting, agg in summary["aggregate"].items():
    values = np.array([reports[t]["settings"][setting]["mAP"] for t in (1, 3)])
    assert agg["keys"] == [1, 3] and agg["std"]["mAP"] == pytest.approx(values.std(ddof=1), abs=1e-9)  # as above.
  assert "sample std (ddof=1)" in trials.format_table(summary, "cmd")
  # a split that was never run, and a workdir holding another split, are named.
  with pytest.raises(MissingFileError, match=r"trial 4: no .*trial_4/config.json"):
    trials.collect(_plan(workdir, regdb_root, trials="3-4"), run=False)
  os.rename(os.path.join(workdir, "trial_3"), os.path.join(workdir, "trial_5"))
  try:
    with pytest.raises(DataError, match=r"trial_5/config.json has data.trial=3, not 5"):
      trials.collect(_plan(workdir, regdb_root, trials="5"), run=False)
  finally:
    os.rename(os.path.join(workdir, "trial_5"), os.path.join(workdir, "trial_3"))


def test_dry_run_prints_each_trials_command(regdb_root, tmp_path):
  plan = _plan(str(tmp_path), regdb_root, trials="2,4")
  command = plan.command(4)
  assert command[1].endswith("main.py") and f"--workdir={tmp_path}/trial_4" in command
  assert "--config=configs/regdb.py" in command and "--config.data.trial=4" in command
  assert f"--config.data.root={regdb_root}" in command and "--config.model.pretrained=none" in command


def test_plan_flags_are_checked_before_anything_runs(regdb_root, tmp_path):
  assert trials.parse_trials("1-3,5") == (1, 2, 3, 5) and trials.parse_trials("0") == (0,)
  for spec, message in (("3-1", "empty"), ("a", "integers and ranges"), ("1,1", "twice"), ("", "integers")):
    with pytest.raises(FlagError, match=message):
      trials.parse_trials(spec)
  assert _plan(str(tmp_path), regdb_root).vary == "data.trial"
  assert trials.make_plan("sysu", None, "0-1", None, (), str(tmp_path)).vary == "seed"
  assert trials.make_plan("casia_nir_vis", None, "1", None, (), str(tmp_path)).vary == "data.fold"
  with pytest.raises(FlagError, match="--vary=data.trail"):
    _plan(str(tmp_path), regdb_root, vary="data.trail")
  with pytest.raises(FlagError, match="--set=model.widht=8"):
    _plan(str(tmp_path), regdb_root, overrides=("model.widht=8",))
  with pytest.raises(FlagError, match="is the field the trials vary"):
    _plan(str(tmp_path), regdb_root, overrides=("data.trial=2",))
  with pytest.raises(FlagError, match="one of --dataset"):
    trials.make_plan("regdb", "configs/regdb.py", "1", None, (), str(tmp_path))
  with pytest.raises(MissingFileError, match="configs/nope.py not found"):
    trials.make_plan("nope", None, "1", None, (), str(tmp_path))
  ablation = trials.make_plan(None, "configs/ablations/baseline.py:regdb", "1-2", None, (), str(tmp_path))
  assert ablation.vary == "data.trial" and ablation.command(2)[2] == "--config=configs/ablations/baseline.py:regdb"
