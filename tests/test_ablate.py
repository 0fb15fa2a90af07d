"""The ablation configs and the table of launch/ablate.py (the runs themselves are the slow end-to-end path: the
tables here are collected from hand-written reports with --collect_only); every row's model, and every value of each
model option, traced as the train step runs them under jax.jit."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ablations import DATASET_CONFIGS
from fdnm_jax import losses
from fdnm_jax.errors import FlagError
from fdnm_jax.models import fdnm_from_config, resnet
from fdnm_jax.models.fdnm import CNM_ORIGINALS, DTYPES
from fdnm_jax.models.frequency import ANM_BN_MODES, ANM_INORM_STATS
from fdnm_jax.models.spectral import PHASE_CUTS, PHASE_GUARDS, SPECTRAL_TRANSFORMS
from launch import ablate
from tests import subprocesses

# The numerics alternatives: row -> the model fields it sets, written out here from configs/default.py's options.
NUMERICS_ROWS = {
    "full_reference": {"anm_bn": "reference", "anm_inorm_stats": "instance", "phase_guard": "exact",
                       "conjugate_pairs": False, "phase_cut": "arctan2", "cnm_original": "raw"},
    "full_exact_phase": {"phase_guard": "exact", "conjugate_pairs": False},
    "full_principal_cut": {"phase_cut": "principal"},
    "full_cnm_standardized": {"cnm_original": "batch_standardized"},
    "full_inorm_exclude_dc": {"anm_inorm_stats": "exclude_dc"},
    "full_anm_bn_reference": {"anm_bn": "reference"},
    "full_anm_bn_joint": {"anm_bn": "joint"},
    "full_anm_bn_none": {"anm_bn": "none"},
}


@pytest.mark.parametrize("dataset", sorted(DATASET_CONFIGS))
@pytest.mark.parametrize("row", ablate.ALL_ROWS)
def test_every_row_builds_for_every_data_set(row, dataset):
  config = ablate.load_config(row, dataset)
  assert config.dataset == dataset and config.name.endswith(row)
  if row == "baseline":
    assert config.model.agp_stages == () and config.model.anm_stage == 0 and config.loss.cnm_weight == 0.0


def test_rows_differ_from_the_baseline_only_in_their_fdnm_parts():
  base = ablate.load_config("baseline", "regdb")
  diff = ablate.config_diff(ablate.load_config("agp_at_3", "regdb"), base)
  assert set(diff.split(", ")) == {"agp_stages=(3,)", "anm_stage=4", "cnm_weight=0.8"}
  assert ablate.config_diff(ablate.load_config("anm", "regdb"), base) == "anm_stage=4"
  assert ablate.config_diff(base, base) == "—"


@pytest.mark.parametrize("row", sorted(NUMERICS_ROWS))
def test_numerics_rows_are_the_full_model_with_only_their_fields_changed(row):
  assert row in ablate.ALL_ROWS
  full = ablate.flatten(ablate.load_config("full", "synthetic"))
  config = ablate.flatten(ablate.load_config(row, "synthetic"))
  fields = {f"model.{k}": v for k, v in NUMERICS_ROWS[row].items()}
  assert {k: config[k] for k in fields} == fields
  changed = {k for k in full if k != "name" and config[k] != full[k]}
  assert changed <= set(fields)
  assert config["name"] == f"synthetic_{row}"


def test_unknown_row_and_data_set_are_named():
  with pytest.raises(FileNotFoundError, match="no_such_row"):
    ablate.load_config("no_such_row", "regdb")
  with pytest.raises(ValueError, match="market"):
    ablate.load_config("full", "market")


def test_seeds_per_row_and_their_errors():
  rows = ["baseline", "agp", "full"]
  assert ablate.row_seeds(rows, ["0", "1", "2"], ["agp"], 7) == {"baseline": (0, 1, 2), "agp": (0,),
                                                                 "full": (0, 1, 2)}
  assert ablate.row_seeds(rows, [], [], 7) == {"baseline": (7,), "agp": (7,), "full": (7,)}
  with pytest.raises(FlagError, match="anm"):
    ablate.row_seeds(rows, ["0"], ["anm"], 0)
  with pytest.raises(FlagError, match="twice"):
    ablate.row_seeds(rows, ["1", "1"], [], 0)
  with pytest.raises(FlagError, match="integers"):
    ablate.row_seeds(rows, ["a"], [], 0)


def test_plan_puts_each_seed_in_its_own_workdir_and_refuses_a_seed_override(tmp_path):
  plan = ablate.plan_of("full", "synthetic", (0, 2), ["schedule.num_epochs=1"], str(tmp_path))
  assert plan.trial_dir(2) == os.path.join(str(tmp_path), "full", "trial_2")
  command = plan.command(2)
  assert "--config.seed=2" in command and "--config.schedule.num_epochs=1" in command
  assert any(c.startswith("--config=") and c.endswith(os.path.join("ablations", "full.py") + ":synthetic")
             for c in command)
  with pytest.raises(FlagError, match="--seeds=3"):
    ablate.plan_of("full", "synthetic", (0,), ["seed=3"], str(tmp_path))


@pytest.mark.parametrize("height,width,last_stride", [(128, 64, 1), (64, 32, 1), (100, 50, 1), (127, 61, 2)])
def test_layer4_size_is_the_backbones(height, width, last_stride):
  # Hand-computed for the first two (stride 16: 128/16 = 8, 64/16 = 4); all against the backbone's own shapes.
  expected = {(128, 64, 1): (8, 4), (64, 32, 1): (4, 2)}
  size = ablate.layer4_size({"input": {"height": height, "width": width}, "model": {"last_stride": last_stride}})
  if (height, width, last_stride) in expected:
    assert size == expected[(height, width, last_stride)]
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=2, last_stride=last_stride)
  x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  shapes = jax.eval_shape(lambda v: model.init_with_output(jax.random.key(0), v, None)[0], x)
  assert shapes["layer4"].shape[1:3] == size


def _report(name, values, cosines, step=0.1, params=1_000_000):
  """A results/<name>.json with two directions; `values` = (rank1, mAP) per direction."""
  settings = {d: {"rank1": r1, "rank10": r1 + 10.0, "rank20": r1 + 20.0, "mAP": m, "mINP": m / 2}
              for d, (r1, m) in zip(("v2i", "i2v"), values)}
  return {"name": name, "settings": settings, "num_params": params, "train_step_seconds": step,
          "health": {"mean_cosine_to_mean": {"embedding": {"infrared": cosines[0], "visible": cosines[1]}}},
          "model_selection": {"split": None}}


def _write_run(workdir, row, seed, report):
  run = os.path.join(workdir, row, f"trial_{seed}")
  os.makedirs(os.path.join(run, "results"))
  config = {"name": report["name"], "dataset": "synthetic", "seed": seed, "model": {"last_stride": 1},
            "input": {"height": 128, "width": 64}}
  with open(os.path.join(run, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(run, "results", f"{report['name']}.json"), "w") as f:
    json.dump(report, f)


def _cells(line):
  return [c.strip() for c in line.strip().strip("|").split("|")]


def test_collect_only_table_is_mean_and_population_std_over_the_seeds(tmp_path):
  workdir = str(tmp_path / "abl")
  rng = np.random.default_rng(0)
  per_seed = {}  # seed -> (v2i rank1, v2i mAP, i2v rank1, i2v mAP, cos infrared, cos visible, step)
  for seed in (0, 1, 2):
    v = np.round(rng.uniform(10, 90, 4), 3)
    c = np.round(rng.uniform(0.1, 0.9, 2), 5)
    per_seed[seed] = (*v, *c, 0.1 * (seed + 1))
    _write_run(workdir, "full", seed, _report("synthetic_full", [(v[0], v[1]), (v[2], v[3])], c, 0.1 * (seed + 1)))
  _write_run(workdir, "agp", 0, _report("synthetic_agp", [(41.0, 42.5), (43.0, 44.25)], (0.5, 0.25), 0.3, 2_000_000))
  out = str(tmp_path / "table.md")
  cmd = [sys.executable, os.path.join(subprocesses.REPO, "launch", "ablate.py"), "--collect_only", "--rows=full,agp",
         "--seeds=0,1,2", "--single_seed_rows=agp", f"--workdir={workdir}", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=subprocesses.REPO, env=subprocesses.env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| row | seeds |"))
  header = _cells(lines[start])
  assert header[:7] == ["row", "seeds", "v2i R1", "v2i R10", "v2i R20", "v2i mAP", "v2i mINP"]
  full, agp = (dict(zip(header, _cells(lines[start + k]))) for k in (2, 3))
  values = np.array([per_seed[s] for s in (0, 1, 2)], np.float64)

  def expect(column, digits=2):
    return f"{np.mean(column):.{digits}f} ± {np.std(column):.{digits}f}"  # NumPy's std: ddof=0 (population).

  assert full["seeds"] == "3" and agp["seeds"] == "1"
  assert full["v2i R1"] == expect(values[:, 0]) and full["v2i mAP"] == expect(values[:, 1])
  assert full["i2v R1"] == expect(values[:, 2]) and full["i2v mAP"] == expect(values[:, 3])
  assert full["v2i R10"] == expect(values[:, 0] + 10.0) and full["i2v mINP"] == expect(values[:, 3] / 2)
  assert full["emb. cos infrared"] == expect(values[:, 4], 4) and full["emb. cos visible"] == expect(values[:, 5], 4)
  assert float(full["step (s)"]) == pytest.approx(0.2, abs=5e-4)  # mean of 0.1, 0.2, 0.3, printed to 3 digits.
  assert full["layer4"] == "8x4" and full["params (M)"] == "1.000"
  assert (agp["seeds"], agp["v2i R1"], agp["v2i mAP"], agp["i2v mAP"], agp["i2v mINP"]) == (
      "1", "41.00", "42.50", "44.25", "22.12")  # one seed: its numbers, no ±; 44.25 / 2 = 22.125 rounds to even.
  assert (agp["emb. cos infrared"], agp["params (M)"], agp["step (s)"]) == ("0.5000", "2.000", "0.300")
  seeds_at = next(i for i, line in enumerate(lines) if line.startswith("| row | seed |"))
  per_run = [dict(zip(_cells(lines[seeds_at]), _cells(line))) for line in lines[seeds_at + 2:] if line.startswith("|")]
  assert [(r["row"], r["seed"]) for r in per_run] == [("full", "0"), ("full", "1"), ("full", "2"), ("agp", "0")]
  assert all(r["v2i mAP"] == f"{per_seed[int(r['seed'])][1]:.2f}" for r in per_run[:3])


def test_collect_only_names_a_missing_run(tmp_path):
  workdir = str(tmp_path / "abl")
  _write_run(workdir, "full", 0, _report("synthetic_full", [(1.0, 2.0), (3.0, 4.0)], (0.1, 0.2)))
  cmd = [sys.executable, os.path.join(subprocesses.REPO, "launch", "ablate.py"), "--collect_only", "--rows=full",
         "--seeds=0,1", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=subprocesses.REPO, env=subprocesses.env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and "trial_1" in proc.stderr and "error:" in proc.stderr


def test_markdown_table_of_single_reports():
  def report(m, step):
    row = {"rank1": m, "rank10": m + 1, "rank20": m + 2, "mAP": m + 3, "mINP": m + 4}
    return {"settings": {"v2i": row, "i2v": row}, "num_params": 1_500_000, "train_step_seconds": step}
  table = ablate.markdown_table([("baseline", report(10.0, 0.25), "—"), ("full", report(20.0, None), "x=1")])
  lines = table.splitlines()
  assert lines[0].startswith("| row | seeds | v2i R1 | v2i R10 | v2i R20 | v2i mAP | v2i mINP | i2v R1 |")
  assert lines[2] == ("| baseline | 1 | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 "
                      "| 1.500 | 0.250 | — |")
  assert lines[3].endswith("| 1.500 | — | x=1 |")
  only = ablate.markdown_table([("baseline", report(10.0, 0.25), "—")], metrics=["mAP", "rank1"]).splitlines()
  assert only[0] == "| row | seeds | v2i R1 | v2i mAP | i2v R1 | i2v mAP | params (M) | step (s) | config diff |"
  assert only[2] == "| baseline | 1 | 10.00 | 13.00 | 10.00 | 13.00 | 1.500 | 0.250 | — |"


def _trace_train_loss(config) -> None:
  """Traces `config`'s model (at width 4, one block per stage) in train mode and its loss as the train step runs
  them, with jax.eval_shape (nothing compiled): a module that needs a concrete value (a Python float of a traced
  array) raises here."""
  config.model.stage_sizes, config.model.width = (1, 1, 1, 1), 4
  model = fdnm_from_config(config.model, num_classes=3)
  images = jax.ShapeDtypeStruct((4, 64, 32, 3), jnp.float32)
  labels, modality = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int32), np.array([0] * 4 + [1] * 4, np.int32)

  def loss(visible, infrared):  # the train-mode pass, traced once: init's.
    outputs, _ = model.init_with_output(jax.random.key(0), visible, infrared, train=True)
    return losses.total_loss(outputs, labels, modality, config.loss)

  total, terms = jax.eval_shape(loss, images, images)
  assert total.shape == () and total.dtype == jnp.float32 and "id" in terms


@pytest.mark.parametrize("row", ablate.ALL_ROWS)
def test_every_rows_model_and_loss_trace_under_jit(row):
  """Each ablation row's model and loss trace under jax.jit (`_trace_train_loss`): a row that cannot be jitted
  fails here, not at the first step of a user's ablation run."""
  _trace_train_loss(ablate.load_config(row, "synthetic"))


# Every value each enumerated model option takes (the modules' own lists). ANM stays on (anm_stage 3 or 4; the rows
# above trace anm_stage=0) so that its options are traced too.
MODEL_OPTION_VALUES = {
    "spectral_transform": SPECTRAL_TRANSFORMS, "phase_guard": PHASE_GUARDS, "phase_cut": PHASE_CUTS,
    "anm_bn": ANM_BN_MODES, "anm_inorm_stats": ANM_INORM_STATS, "cnm_original": CNM_ORIGINALS,
    "dtype": tuple(sorted(DTYPES)), "conjugate_pairs": (True, False), "anm_stage": (3, 4),
    "anm_keep_original": (True, False), "num_parts": (0, 2)}
OPTION_COMBINATIONS = max(len(v) for v in MODEL_OPTION_VALUES.values())


@pytest.mark.parametrize("index", range(OPTION_COMBINATIONS))
def test_every_model_option_value_traces_under_jit(index):
  """The full model with every option at its `index`-th value (cycling through shorter lists) traces under jax.jit
  (`_trace_train_loss`): OPTION_COMBINATIONS traces set each value of each option at least once, with the others."""
  config = ablate.load_config("full", "synthetic")
  for field, values in MODEL_OPTION_VALUES.items():
    config.model[field] = values[index % len(values)]
  _trace_train_loss(config)
