"""ImageNet init is the recipe (issue 16): on fixture trees in each data set's layout, the SYSU-MM01 / RegDB / LLCM
configs refuse a fresh run without weights; with a torchvision-layout weights file they train; `pretrained=none`
trains from scratch and every report says so.

Fixture trees: tests/input_pipeline/test_sysu.py's and test_llcm.py's builders (real JPEGs in the exact layout), and
for RegDB the synthetic generator, which writes the RegDB layout (Visible/, Thermal/, idx/ split files; as
tests/input_pipeline/test_tfds_builders.py uses it). The weights file holds random values under the torchvision
names of a tiny Bottleneck ResNet (stage_sizes (1, 1, 1, 1), width 8), the size every run here is cut to.
One training run per data set: SYSU-MM01 and RegDB with the weights file, LLCM from scratch through main.py.
"""

import json
import os

import numpy as np
import pytest

from configs import llcm, regdb, sysu
from fdnm_jax import pretrained, run_config, train
from fdnm_jax import eval_mode
from input_pipeline.datasets import synthetic
from tests import subprocesses
from tests.configs import with_overrides
from tests.input_pipeline import test_llcm, test_sysu

# Under `--dist loadgroup` (.ci/run) this module stays on one xdist worker, so its module fixtures (trained
# runs) are built once, not once per worker.
pytestmark = pytest.mark.xdist_group(__name__)

CONFIGS = {"sysu": sysu, "regdb": regdb, "llcm": llcm}
# Tiny overrides: 2 steps of P=2 x K=2 at 32 x 16 on the tiny ResNet (the fixture trees have 3 training ids).
TINY = {"input.height": 32, "input.width": 16, "input.pad": 2, "input.num_ids_per_batch": 2,
        "input.num_instances": 2, "input.eval_batch_size": 16, "model.stage_sizes": (1, 1, 1, 1), "model.width": 8,
        "schedule.num_epochs": 2, "schedule.steps_per_epoch": 1, "schedule.warmup_epochs": 1,
        "schedule.decay_epochs": (1,), "checkpoint.async_save": False, "logging.every_steps": 1}


def _flag(value):
  return f"({','.join(str(v) for v in value)},)" if isinstance(value, tuple) else str(value)


OVERRIDES = tuple(f"--config.{k}={_flag(v)}" for k, v in TINY.items())


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  """{dataset: root} of the three fixture trees."""
  base = tmp_path_factory.mktemp("data")
  return {"sysu": test_sysu.write_tree(base / "SYSU-MM01"), "llcm": test_llcm.write_tree(base / "LLCM"),
          # 3 training ids, as the other two trees: the three runs share one compiled train step.
          "regdb": synthetic.generate(str(base / "RegDB"), num_train_ids=3, num_test_ids=3, images_per_id=2,
                                      num_cameras=2, height=32, width=16, seed=0)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A torchvision-layout .npz of the tiny ResNet with random values."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("weights") / "tiny_resnet.npz"
  np.savez(path, **{k: rng.normal(0.0, 0.1, s).astype(np.float32)
                    for k, s in pretrained.expected_shapes((1, 1, 1, 1), 8).items()})
  return str(path)


def _config(dataset, root, init):
  config = with_overrides(CONFIGS[dataset].get_config(), TINY)
  config.data.root = root
  config.model.pretrained = init
  return config


@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_a_fresh_run_without_weights_is_refused_before_anything_starts(trees, tmp_path, dataset):
  workdir = str(tmp_path / "run")
  proc = subprocesses.run_main(workdir, f"--config.data.root={trees[dataset]}", *OVERRIDES,
                               config=os.path.join(subprocesses.REPO, "configs", f"{dataset}.py"), check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
  assert line.startswith("error: 1 config problem: model.pretrained: not given; this recipe starts from ImageNet")
  for words in ("resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1", "python -m fdnm_jax.convert",
                "--config.model.pretrained=none"):
    assert words in line
  assert not os.path.exists(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["sysu", "regdb"])
def test_with_a_weights_file_the_recipe_trains_and_reports_its_init(trees, weights, tmp_path, dataset):
  workdir = str(tmp_path / "run")
  report = train.train_and_evaluate(_config(dataset, trees[dataset], weights), workdir)
  assert report["step"] == 2 and report["init"] == "ImageNet (tiny_resnet.npz)"
  with open(os.path.join(workdir, "results", f"{dataset}.json")) as f:
    assert json.load(f)["init"] == "ImageNet (tiny_resnet.npz)"
  assert run_config.load_stored(workdir).model.pretrained == weights
  for setting in report["settings"].values():
    assert 0.0 <= setting["mAP"] <= 100.0


@pytest.mark.slow
def test_pretrained_none_trains_from_scratch_and_every_report_says_so(trees, tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocesses.run_main(workdir, f"--config.data.root={trees['llcm']}", "--config.model.pretrained=none",
                               *OVERRIDES, config=os.path.join(subprocesses.REPO, "configs", "llcm.py"))
  assert "llcm (llcm, step 2, from scratch):" in proc.stdout  # the printed results table's title
  with open(os.path.join(workdir, "results", "llcm.json")) as f:
    assert json.load(f)["init"] == "from scratch"
  stored = run_config.load_stored(workdir)
  assert stored.model.pretrained == "none"
  report = eval_mode.evaluate_checkpoint(stored, workdir)
  assert report["init"] == "from scratch"
  with open(report["files"]["md"]) as f:
    assert f.readline().startswith("# Evaluation: llcm (llcm), checkpoint step 2, from scratch")
