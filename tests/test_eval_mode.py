"""`--mode=eval` end to end on the tiny config: the numbers equal what training wrote for the same step; the workdir's
config.json is the default config; evaluation reads only the test sets; a --config may change evaluation fields
only; user errors are one line, internal errors keep their traceback.

The module trains the tiny config once in-process (4 steps, checkpoints at 2 and 4, an evaluation at step 2 in
metrics.jsonl and the final one in results/tiny.json), its synthetic set generated outside the workdir
(config.data.root), and evaluates its checkpoints.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fdnm_jax import checkpoints, eval_mode, inference, run_config, train
from fdnm_jax.errors import CheckpointError, ConfigError
from fdnm_jax.evaluation import protocols
from tests import subprocesses
from tests.configs import tiny

# Under `--dist loadgroup` (.ci/run) this module stays on one xdist worker, so its module fixtures (trained
# runs) are built once, not once per worker.
pytestmark = pytest.mark.xdist_group(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTIONS = ("visible_to_infrared", "infrared_to_visible")


def _config(data_root=""):
  config = tiny.get_config()
  config.evals.every_steps = 2  # training also evaluates the step-2 checkpoint (into metrics.jsonl).
  config.data.root = data_root
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("tiny_eval")
  workdir, data = str(base / "run"), str(base / "synthetic")
  train.train_and_evaluate(_config(data), workdir)
  return workdir


def _data_root(workdir):
  return os.path.join(os.path.dirname(workdir), "synthetic")


def _training_numbers(workdir, step):
  """{direction: {metric: value}} the training run wrote for `step` (metrics.jsonl test/<direction>/<metric>)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  row = [r for r in rows if r["step"] == step and f"test/{DIRECTIONS[0]}/mAP" in r]
  assert len(row) == 1, f"training wrote {len(row)} evaluations at step {step}"
  return {d: {k: row[0][f"test/{d}/{k}"] for k in protocols.METRICS} for d in DIRECTIONS}


def _assert_same_numbers(report, want):
  assert set(report["settings"]) == set(DIRECTIONS)
  for d in DIRECTIONS:
    r = report["settings"][d]
    assert len(r["per_trial"]) == 1 and r["std"] == {k: 0.0 for k in protocols.METRICS}
    for k in protocols.METRICS:
      assert r["mean"][k] == want[d][k], (d, k)


@pytest.mark.slow
def test_latest_checkpoint_matches_the_final_training_evaluation_and_writes_the_report(trained, capsys):
  report = eval_mode.evaluate_checkpoint(None, trained)  # no --config: the workdir's config.json.
  with open(os.path.join(trained, "results", "tiny.json")) as f:
    final = json.load(f)
  assert report["step"] == final["step"] == 4
  _assert_same_numbers(report, final["settings"])
  assert _training_numbers(trained, 4) == {d: {k: final["settings"][d][k] for k in protocols.METRICS}
                                           for d in DIRECTIONS}

  json_path = os.path.join(trained, "results", "eval_tiny_step4.json")
  assert report["files"] == {"json": json_path, "md": json_path[:-5] + ".md"}
  with open(json_path) as f:
    written = json.load(f)
  assert written["step"] == 4 and written["untrained"] is False
  assert written["checkpoint"] == os.path.join(trained, "checkpoints", "4")
  assert written["rerank"]["enabled"] is False
  # The run's config as config.json stores it (model.pretrained "" written as "none": from scratch).
  assert written["config"] == json.loads(run_config.canonical(_config(_data_root(trained))).to_json_best_effort())
  assert written["config_origin"] == [f"config: {os.path.join(trained, 'config.json')}"]
  assert written["config_overrides"] == {}
  assert written["gallery_sampling"] == {d: "none: the whole test sets of split 1 (one trial)" for d in DIRECTIONS}
  assert written["settings"]["visible_to_infrared"]["mean"] == report["settings"]["visible_to_infrared"]["mean"]
  with open(report["files"]["md"]) as f:
    md = f.read()
  assert md.startswith("# Evaluation: tiny (synthetic), checkpoint step 4")
  assert "| visible_to_infrared | 1 |" in md and '"agp_stages"' in md and "UNTRAINED" not in md
  assert "## Published (quoted, not measured)" in md and "No published numbers are recorded for synthetic" in md
  assert written["published"] == {d: [] for d in DIRECTIONS}
  assert "| setting | trials | Rank-1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_flag_picks_that_step_and_a_config_may_override_evaluation_fields_only(trained):
  given = _config(_data_root(trained))
  given.evals.query_chunk = 3  # an evaluation field: taken, and listed in the report.
  given.optim.base_lr = 0.5  # a training-only field: ignored, and listed.
  report = eval_mode.evaluate_checkpoint(given, trained, checkpoint="2")
  assert report["step"] == 2 and report["checkpoint"] == os.path.join(trained, "checkpoints", "2")
  _assert_same_numbers(report, _training_numbers(trained, 2))  # the query chunk changes no number.
  assert report["config_overrides"] == {"evals.query_chunk": 3}
  assert report["config"]["optim"]["base_lr"] == tiny.get_config().optim.base_lr
  assert report["config_origin"][1:] == ["overridden for this evaluation: evals.query_chunk: 1024 -> 3",
                                         "ignored (training only): optim.base_lr: 0.1 -> 0.5"]
  with open(report["files"]["md"]) as f:
    assert "- overridden for this evaluation: evals.query_chunk: 1024 -> 3" in f.read()
  assert eval_mode.resolve_checkpoint(trained, os.path.join(trained, "checkpoints", "2") + "/") == (trained, 2)


def test_a_config_that_differs_in_a_model_field_is_refused_naming_the_fields(tmp_path):
  stored = tiny.get_config()
  (tmp_path / "config.json").write_text(stored.to_json_best_effort())
  given = tiny.get_config()
  given.model.width = 16
  given.model.anm_keep_original = True  # parameter-free, still another model.
  given.evals.test_flip = not stored.evals.test_flip  # an evaluation field: may differ.
  with pytest.raises(ConfigError) as e:
    inference.resolve_config(str(tmp_path), given)
  message = str(e.value)
  assert "model.anm_keep_original (trained: false, --config: true)" in message
  assert "model.width (trained: 8, --config: 16)" in message and "evals.test_flip" not in message
  assert "Drop --config" in message and "\n" not in message
  given.model.width, given.model.anm_keep_original = 8, False
  given.model.pretrained = "/weights/resnet50.npz"  # the initial weights only: training-only for evaluation.
  resolved = inference.resolve_config(str(tmp_path), given)
  assert [c.key for c in resolved.overridden] == ["evals.test_flip"]
  assert resolved.config.evals.test_flip is given.evals.test_flip
  assert [c.key for c in resolved.ignored] == ["model.pretrained"] and resolved.config.model.pretrained == ""


def _test_only_copy(root, copy, trial=1):
  """Copies the test part of a RegDB-layout set (the split's test lists, the images they name, the synthetic
  manifest) to `copy`: no training list, no training image."""
  os.makedirs(os.path.join(copy, "idx"))
  shutil.copy(os.path.join(root, "synthetic_manifest.json"), copy)
  for kind in ("visible", "thermal"):
    rel = f"idx/test_{kind}_{trial}.txt"
    shutil.copy(os.path.join(root, rel), os.path.join(copy, rel))
    with open(os.path.join(root, rel)) as f:
      for line in f:
        image = line.split()[0]
        os.makedirs(os.path.dirname(os.path.join(copy, image)), exist_ok=True)
        shutil.copy(os.path.join(root, image), os.path.join(copy, image))


@pytest.mark.slow
def test_main_eval_without_config_on_a_test_only_copy_of_the_data_set(trained, tmp_path):
  # The run's data set (config.json's data.root) replaced by a copy of its test part: evaluation needs nothing else.
  root = _data_root(trained)
  full = str(tmp_path / "full")
  shutil.move(root, full)
  try:
    _test_only_copy(full, root)
    assert not any(f.startswith("train_") for f in os.listdir(os.path.join(root, "idx")))
    proc = subprocesses.run_main(trained, "--mode=eval", "--checkpoint=4", config=None, check=False)
  finally:
    shutil.rmtree(root, ignore_errors=True)
    shutil.move(full, root)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(trained, "results", "eval_tiny_step4.json")) as f:
    report = json.load(f)
  _assert_same_numbers(report, _training_numbers(trained, 4))


def test_main_eval_with_a_config_whose_model_field_differs_is_one_line_naming_it(tmp_path):
  workdir = tmp_path / "w"
  os.makedirs(workdir / "checkpoints" / "4")
  (workdir / "checkpoints" / "4" / checkpoints.COMMIT_MARKER).write_text("")
  (workdir / "config.json").write_text(tiny.get_config().to_json_best_effort())
  proc = subprocesses.run_main(str(workdir), "--mode=eval", "--config.model.width=16", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and "model.width (trained: 8, --config: 16)" in error[0], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wider_config_json(trained, tmp_path_factory):
  """A copy of the trained workdir whose config.json claims model.width=16 (its checkpoints have 8)."""
  workdir = str(tmp_path_factory.mktemp("edited") / "run")
  shutil.copytree(trained, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["model"]["width"] = 16
  with open(path, "w") as f:
    json.dump(config, f)
  return workdir


@pytest.mark.slow
def test_a_checkpoint_of_another_width_is_a_checkpoint_error_naming_the_field(wider_config_json):
  with pytest.raises(CheckpointError) as e:
    eval_mode.evaluate_checkpoint(None, wider_config_json)
  message = str(e.value)
  assert message.startswith(f"checkpoint step 4 at {os.path.join(wider_config_json, 'checkpoints', '4')} does not "
                            "fit this config:")
  assert "array(s) differ, first " in message and "model.width: 8 in the checkpoint, 16 in this config" in message
  assert "\n" not in message


_BUGGY_MAIN = """
import sys
sys.argv = ["main.py"] + sys.argv[1:]
sys.path.insert(0, {repo!r})
import main
from absl import app
from fdnm_jax import checkpoints
checkpoints.compare_shapes = lambda *a, **k: checkpoints.ShapeMismatch((), (), ())  # the bug: no shape check.
app.run(main.main)
"""


@pytest.mark.slow
def test_an_internal_error_keeps_its_traceback(wider_config_json):
  # A buggy restore path (the shape check skipped) reads a width-8 checkpoint into a width-16 model: that is the
  # code's fault, not the user's, so main.py prints the traceback, not a one-line "error:".
  env = subprocesses.env(devices=1)
  proc = subprocess.run([sys.executable, "-c", _BUGGY_MAIN.format(repo=REPO), "--mode=eval",
                         f"--workdir={wider_config_json}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode != 0
  assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
  assert not any(line.startswith("error: ") for line in proc.stderr.splitlines()), proc.stderr[-3000:]


def _fake_workdir(tmp_path, steps):
  for step in steps:
    os.makedirs(tmp_path / "checkpoints" / str(step) / "state")
    (tmp_path / "checkpoints" / str(step) / checkpoints.COMMIT_MARKER).write_text("")
  os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1")  # an unfinished save is not a step,
  os.makedirs(tmp_path / "checkpoints" / "8" / "state")  # nor a step folder without the commit marker.
  return str(tmp_path)


def test_checkpoint_resolution(tmp_path):
  workdir = _fake_workdir(tmp_path, (2, 4))
  assert eval_mode.resolve_checkpoint(workdir, None) == (workdir, 4)
  assert eval_mode.resolve_checkpoint(workdir, "2") == (workdir, 2)
  with pytest.raises(FileNotFoundError, match=r"no step 3 under .*checkpoints \(steps there: \[2, 4\]\)"):
    eval_mode.resolve_checkpoint(workdir, "3")
  with pytest.raises(FileNotFoundError, match=r"no step 8 under .*checkpoints \(steps there: \[2, 4\]\)"):
    eval_mode.resolve_checkpoint(workdir, "8")
  with pytest.raises(FileNotFoundError, match="its save never finished"):
    eval_mode.resolve_checkpoint(workdir, str(tmp_path / "checkpoints" / "8"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    eval_mode.resolve_checkpoint(workdir, str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match=r"<workdir>/checkpoints/<step>"):
    eval_mode.resolve_checkpoint(workdir, str(tmp_path / "checkpoints"))
  assert eval_mode.resolve_checkpoint(str(tmp_path / "empty"), None) == (None, None)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / "never_trained")
  with pytest.raises(FileNotFoundError) as e:
    eval_mode.evaluate_checkpoint(_config(), workdir)
  message = str(e.value)
  assert os.path.join(workdir, "checkpoints") in message and "train first" in message
  assert "--allow_untrained" in message
  assert not os.path.exists(workdir)


@pytest.mark.slow  # no training, but it compiles the model's init and embedding (~15 s on 2 cores).
def test_allow_untrained_with_re_ranking_marks_every_report(tmp_path, capsys):
  config = _config()
  config.evals.rerank = True
  config.evals.rerank_k1 = 4
  report = eval_mode.evaluate_checkpoint(config, str(tmp_path), allow_untrained=True)
  assert report["untrained"] is True and report["step"] == 0 and report["checkpoint"] is None
  assert report["warning"].startswith("UNTRAINED")
  assert report["rerank"] == {"enabled": True, "k1": 4, "k2": 6, "lambda": 0.3}
  assert os.path.basename(report["files"]["json"]) == "eval_tiny_step0_UNTRAINED_rerank.json"
  with open(report["files"]["md"]) as f:
    head = f.read().splitlines()[:4]
  assert head[0] == "# Evaluation: tiny (synthetic), UNTRAINED"
  assert head[2].startswith("**UNTRAINED MODEL") and head[3].startswith("**k-reciprocal re-ranking ON (k1=4")
  out = capsys.readouterr().out
  assert "UNTRAINED MODEL" in out and "re-ranking ON" in out
  for r in report["settings"].values():
    assert 0 <= r["mean"]["mINP"] <= r["mean"]["mAP"] <= 100


def test_main_user_errors_are_one_line_and_eval_flags_need_eval_mode(tmp_path):
  # A missing workdir (no --config: eval reads the workdir's own config): one line naming the folder, no traceback.
  missing = tmp_path / "no_such_run"
  proc = subprocesses.run_main(str(missing), "--mode=eval", config=None, check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and f"no checkpoint to evaluate under {missing / 'checkpoints'}" in error[0]
  assert "--allow_untrained" in error[0]
  proc = subprocesses.run_main(str(tmp_path / "w"), "--mode=train", "--checkpoint=2", check=False)
  assert proc.returncode != 0 and "--checkpoint applies to --mode=eval, extract and visualize only" in proc.stderr
  proc = subprocesses.run_main(str(tmp_path / "w"), "--mode=extract", "--allow_untrained", check=False)
  assert proc.returncode != 0 and "--allow_untrained applies to --mode=eval only" in proc.stderr
