"""`--mode=eval` end to end on the tiny config: the numbers equal what training wrote for the same step.

The module trains the tiny config once in-process (4 steps, checkpoints at 2 and 4, an evaluation at step 2 in
metrics.jsonl and the final one in results/tiny.json) and evaluates its checkpoints.
"""

import json
import os
import subprocess
import sys

import pytest

from fdnm_jax import train
from fdnm_jax.evaluation import eval_mode, protocols
from tests import subprocesses
from tests.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECTIONS = ("visible_to_infrared", "infrared_to_visible")


def _config():
  config = tiny.get_config()
  config.evals.every_steps = 2  # training also evaluates the step-2 checkpoint (into metrics.jsonl).
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny_eval"))
  train.train_and_evaluate(_config(), workdir)
  return workdir


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
      assert r["mean"][k] == pytest.approx(want[d][k], abs=1e-6), (d, k)


@pytest.mark.slow
def test_latest_checkpoint_matches_the_final_training_evaluation_and_writes_the_report(trained, capsys):
  report = eval_mode.evaluate_checkpoint(_config(), trained)
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
  assert written["config"] == json.loads(_config().to_json_best_effort())
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
def test_checkpoint_flag_picks_that_step(trained):
  report = eval_mode.evaluate_checkpoint(_config(), trained, checkpoint="2")
  assert report["step"] == 2 and report["checkpoint"] == os.path.join(trained, "checkpoints", "2")
  _assert_same_numbers(report, _training_numbers(trained, 2))
  assert os.path.exists(os.path.join(trained, "results", "eval_tiny_step2.md"))
  assert eval_mode.resolve_checkpoint(trained, os.path.join(trained, "checkpoints", "2") + "/") == (trained, 2)


def _fake_workdir(tmp_path, steps):
  for step in steps:
    os.makedirs(tmp_path / "checkpoints" / str(step) / "state")
  os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1")  # an unfinished save is not a step.
  return str(tmp_path)


def test_checkpoint_resolution(tmp_path):
  workdir = _fake_workdir(tmp_path, (2, 4))
  assert eval_mode.resolve_checkpoint(workdir, None) == (workdir, 4)
  assert eval_mode.resolve_checkpoint(workdir, "2") == (workdir, 2)
  with pytest.raises(FileNotFoundError, match=r"no step 3 under .*checkpoints \(steps there: \[2, 4\]\)"):
    eval_mode.resolve_checkpoint(workdir, "3")
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


def _main(*args):
  env = subprocesses.env(devices=1)
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"),
                         f"--config={os.path.join(REPO, 'tests', 'configs', 'tiny.py')}", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_main_eval_without_checkpoint_fails_in_one_line_and_eval_flags_need_eval_mode(tmp_path):
  proc = _main("--mode=eval", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "error: no checkpoint to evaluate under" in proc.stderr and "--allow_untrained" in proc.stderr
  proc = _main("--mode=train", f"--workdir={tmp_path / 'w'}", "--checkpoint=2")
  assert proc.returncode != 0 and "--checkpoint applies to --mode=eval, extract and visualize only" in proc.stderr
  proc = _main("--mode=extract", f"--workdir={tmp_path / 'w'}", "--allow_untrained")
  assert proc.returncode != 0 and "--allow_untrained applies to --mode=eval only" in proc.stderr
