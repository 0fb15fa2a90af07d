"""End to end on a tiny CASIA NIR-VIS 2.0 tree: train the FDNM ablation config a few steps, score the face protocol.

The tree is `tests.input_pipeline.test_casia_nir_vis.make_casia_tree` (real JPEG / BMP files, protocol lists in
the download's format). The run trains on fold 1 and scores folds 1 and 2 (config.evals.face_folds); the report's
numbers are checked against the face-protocol definitions recomputed from the run's own embeddings.
"""

import json
import os
import re

import numpy as np
import pytest

from fdnm_jax import train
from fdnm_jax.evaluation import evaluator, face
from launch import ablate
from tests.configs import tiny
from tests.input_pipeline.test_casia_nir_vis import FOLDS, make_casia_tree

# Under `--dist loadgroup` (.ci/run) this module stays on one xdist worker, so its module fixtures (trained
# runs) are built once, not once per worker.
pytestmark = pytest.mark.xdist_group(__name__)


def face_config(root, row="full"):
  """The ablation row `row` on casia_nir_vis at the tiny config's size and schedule (4 steps, 32 x 32)."""
  config = ablate.load_config(row, "casia_nir_vis")
  small = tiny.get_config()
  for section in ("input", "schedule", "checkpoint", "logging"):
    for key, value in small[section].items():
      setattr(config[section], key, value)
  config.model.stage_sizes, config.model.width = small.model.stage_sizes, small.model.width
  config.input.height = config.input.width = 32
  config.data.root = root
  config.evals.face_folds = (1, 2)
  config.model.pretrained = "none"  # the recipe's ImageNet init, declined: a random tiny ResNet.
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = make_casia_tree(str(tmp_path_factory.mktemp("casia") / "NIR-VIS-2.0"))
  workdir = str(tmp_path_factory.mktemp("casia_run"))
  config = face_config(root)
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


@pytest.mark.slow
def test_training_a_few_steps_reports_the_face_protocol_per_fold(run):
  config, workdir, report = run
  assert report["protocol"] == "face" and report["step"] == 4
  assert config.model.agp_stages == (1, 2) and config.model.anm_stage == 4  # FDNM modules on.
  with open(os.path.join(workdir, "results", f"{config.name}.json")) as f:
    written = json.load(f)
  row = written["settings"]["nir_to_vis"]
  assert row["trials"] == 2 and row["num_gallery"] == len(FOLDS[1][1])
  for k in face.METRICS:
    assert 0.0 <= row[k] <= 100.0 and np.isfinite(row[f"{k}_std"])
  # Rank-1 of one fold with one gallery image per subject is a multiple of 1 / probes; the row is the mean over
  # the folds (both fixture folds have the same number of probes), so a multiple of 1 / (folds * probes).
  # The percentages are float64 (fdnm_jax/evaluation/face.py): the count rebuilt from them is a few float64 roundings
  # of a number < 1000 away from an integer (< 1e-12), and a non-multiple is >= 1 / (folds * probes) away.
  counts = row["rank1"] * row["num_query"] * row["trials"] / 100
  assert counts == pytest.approx(round(counts), abs=1e-6)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert any("test/nir_to_vis/vr_far_0_1" in r for r in logged)
  table = evaluator.format_table(written["settings"])
  assert "VR@FAR=0.1%" in table and "±" in table


@pytest.mark.slow
def test_the_ablation_pair_differs_only_in_the_fdnm_modules_and_tabulates(run):
  config, _, report = run
  baseline = ablate.load_config("baseline", "casia_nir_vis")
  full = ablate.load_config("full", "casia_nir_vis")
  assert baseline.dataset == full.dataset == "casia_nir_vis" and baseline.input.height == 128
  assert baseline.model.agp_stages == () and baseline.model.anm_stage == 0 and baseline.loss.cnm_weight == 0.0
  diff = ablate.config_diff(full, baseline)
  assert dict(re.findall(r"(\w+)=(\([^)]*\)|[^,]+)", diff)) == {"agp_stages": "(1, 2)", "anm_stage": "4",
                                                                "cnm_weight": "0.8"}
  table = ablate.markdown_table([("full", report, ablate.config_diff(full, baseline))])
  header = table.splitlines()[0]
  assert "nir_to_vis R1" in header and "nir_to_vis vr_far_1" in header and "nir_to_vis vr_far_0_1" in header
  assert f"{report['settings']['nir_to_vis']['vr_far_1']:.2f}" in table.splitlines()[2]
