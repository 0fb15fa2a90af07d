"""A workdir is one run and its config is the contract (issue 18), through `main.py` as a user runs it.

One finished tiny run (4 steps, in-process) is shared by the tests that only read it; a test that could change it
works on its own copy (shutil.copytree). Commands that must fail before JAX is imported run with a PYTHONPATH whose
`jax`, `flax`, `tensorflow` and `orbax` packages raise when imported: such a command that reached those imports
(and so any model set-up) would die with that error instead of its one-line message.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fdnm_jax import train
from fdnm_jax.errors import DataError
from input_pipeline.datasets import synthetic
from tests import shared_runs, subprocesses
from tests.configs import tiny
from tests.rounding import EPS64

TINY = subprocesses.TINY
HEAVY = ("jax", "flax", "tensorflow", "orbax")


@pytest.fixture
def finished(tiny_run):
  """A finished tiny run (checkpoints 2 and 4, results/tiny.json), the session's (tests/shared_runs.py): read only;
  copy it to change it."""
  return tiny_run[0]


@pytest.fixture(scope="module")
def no_heavy_imports(tmp_path_factory):
  """A PYTHONPATH entry whose jax/flax/tensorflow/orbax packages raise on import (RuntimeError, so that no
  optional `try: import jax` swallows it)."""
  root = tmp_path_factory.mktemp("no_heavy_imports")
  for name in HEAVY:
    os.makedirs(root / name)
    (root / name / "__init__.py").write_text(f"raise RuntimeError('{name} imported before the command was checked')\n")
  return str(root)


def tree_hashes(root):
  """{relative path: sha256} of every file under `root` (`shared_runs.file_digests`), and every folder (as None)."""
  out = {os.path.relpath(os.path.join(folder, d), root) + "/": None for folder, dirs, _ in os.walk(root) for d in dirs}
  out.update(shared_runs.file_digests(root))
  return out


def main_py(workdir, *args, config=TINY, pythonpath=None):
  """main.py in a child process (tests/subprocesses.py's environment); returns the finished process."""
  extra = {}
  if pythonpath:
    extra["PYTHONPATH"] = os.pathsep.join([pythonpath, subprocesses.REPO])
  return subprocesses.run_main(workdir, *args, config=config, check=False, **extra)


def one_line_error(proc, alone=True):
  """The `error: ...` line of a rejected command: exit status 1, no traceback, the error on one line and last.
  `alone`: nothing else on stderr either (a command rejected before JAX logs nothing)."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr[-3000:]
  if alone:
    assert len(lines) == 1, proc.stderr[-3000:]
  return lines[-1]


def test_a_rejected_override_leaves_a_finished_workdir_byte_identical(finished, no_heavy_imports):
  before = tree_hashes(finished)
  proc = main_py(finished, "--config.model.anm_stage=9", pythonpath=no_heavy_imports)
  line = one_line_error(proc)
  assert line.startswith("error: 1 config problem: model.anm_stage=9: expected 0 (no ANM) or a stage in 1..4")
  assert tree_hashes(finished) == before


def test_a_mismatched_resume_stops_listing_the_fields(finished, tmp_path, no_heavy_imports):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  before = tree_hashes(workdir)
  proc = main_py(workdir, "--config.optim.base_lr=0.05", "--config.loss.cnm_weight=0.5", pythonpath=no_heavy_imports)
  line = one_line_error(proc)
  assert line.startswith(f"error: workdir {workdir} holds a run whose config ({workdir}/config.json) differs in 2 "
                         "field(s) that change the trained model or its batches: loss.cnm_weight: 0.8 -> 0.5; "
                         "optim.base_lr: 0.1 -> 0.05.")
  assert "new --workdir" in line and "--allow_config_change" in line
  assert tree_hashes(workdir) == before


@pytest.mark.slow
def test_an_allowed_change_is_recorded_and_trains_the_rest_of_the_run_under_it(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if the run had stopped after its step-2 checkpoint.
  config_json = tree_hashes(workdir)["config.json"]
  proc = main_py(workdir, "--config.optim.base_lr=0.05", "--allow_config_change")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert tree_hashes(workdir)["config.json"] == config_json  # the original run's config is kept as it was.
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    (segment,) = [json.loads(line) for line in f]
  assert segment["step"] == 2 and segment["changes"] == [{"field": "optim.base_lr", "old": 0.1, "new": 0.05}]
  assert segment["config"]["optim"]["base_lr"] == 0.05
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/total" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # one row per step: the old steps 3-4 were dropped.
  # The tiny schedule: 2 steps per epoch, warm-up 1 epoch, x0.1 from epoch 1 on; steps 1-2 ran at the old 0.1. The
  # host logs base_lr * factor in Python floats (optim.lr_factor_fn on an int step): a float64 rounding or two.
  lrs = [r["train/lr"] for r in train_rows]
  assert lrs == pytest.approx([0.1, 0.1, 0.05 * 0.1, 0.05 * 0.1], rel=4 * EPS64)
  assert {"event": "resumed", "step": 2, "dropped_rows": 3} in rows  # steps 3 and 4 and the final evaluation.


@pytest.mark.parametrize("override, words", [
    ("--config.optim.base_lr=-0.01", "optim.base_lr=-0.01: expected a learning rate >= 0"),
    ("--config.input.num_ids_per_batch=0", "input.num_ids_per_batch=0: expected an integer >= 2"),
])
def test_a_bad_value_fails_before_jax_and_before_the_workdir_exists(tmp_path, no_heavy_imports, override, words):
  workdir = str(tmp_path / "run")
  line = one_line_error(main_py(workdir, override, pythonpath=no_heavy_imports))
  assert words in line
  assert not os.path.exists(workdir)


def test_a_corrupt_training_image_fails_before_the_model_is_built(tmp_path, monkeypatch):
  params = dict(num_train_ids=8, num_test_ids=4, images_per_id=4, num_cameras=2, height=32, width=16, seed=0)
  config = tiny.get_config()
  assert {k: config.synthetic[k] for k in params} == params  # the tiny config's own generated set.
  root = synthetic.generate(str(tmp_path / "data"), **params)
  with open(os.path.join(root, "idx", "train_visible_1.txt")) as f:
    first, second = [os.path.join(root, line.split()[0]) for line in f.readlines()[:2]]
  open(first, "wb").close()  # zero bytes
  with open(second, "rb") as f:
    data = f.read()
  with open(second, "wb") as f:
    f.write(data[:len(data) // 2])  # truncated: the header promises more pixels
  config.data.root = root

  def no_model(*args, **kwargs):
    raise AssertionError("a model was built before the images were checked")

  monkeypatch.setattr(train, "fdnm_from_config", no_model)
  workdir = str(tmp_path / "run")
  with pytest.raises(DataError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert message.startswith(f"2 images are unreadable: Image {first} is empty (0 bytes); Image {second} is "
                            "truncated") and "\n" not in message
  assert "--config.data.skip_corrupt=true" in message
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # no contract for a run that never started.
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_help_exits_0():
  proc = subprocess.run([sys.executable, subprocesses.MAIN, "--help"], cwd=subprocesses.REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir:" in proc.stdout and "allow_config_change:" in proc.stdout


@pytest.mark.parametrize("case", ["misspelt key", "misspelt section", "missing file", "broken file", "raising file",
                                  "file raising ValueError"])
def test_config_file_mistakes_are_one_line_before_jax(tmp_path, no_heavy_imports, case):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  raising = tmp_path / "raising.py"
  raising.write_text("from configs import default\n\ndef get_config():\n  c = default.get_config()\n"
                     "  return c.no_such_section\n")
  value_error = tmp_path / "value_error.py"
  value_error.write_text("def get_config():\n  raise ValueError('no such recipe')\n")
  config, args, words = {
      "misspelt key": (TINY, ["--config.model.widht=3"], "--config.model.widht: the config has no field "
                       "model.widht (did you mean --config.model.width?)"),
      "misspelt section": (TINY, ["--config.modle.width=3"], "did you mean --config.model.width?"),
      "missing file": (str(tmp_path / "nope.py"), [], f"config file {tmp_path / 'nope.py'} not found"),
      "broken file": (str(broken), [], f"config file {broken}, line 1: invalid syntax"),
      "raising file": (str(raising), [], f"config file {raising}, line 5: AttributeError"),
      "file raising ValueError": (str(value_error), [], f"config file {value_error}, line 2: ValueError: no such "
                                  "recipe"),
  }[case]
  line = one_line_error(main_py(str(tmp_path / "run"), *args, config=config, pythonpath=no_heavy_imports))
  assert words in line, line
  assert not os.path.exists(tmp_path / "run")


def test_an_internal_error_keeps_its_traceback_and_a_user_error_is_one_line(tmp_path, no_heavy_imports):
  """A bug (here: the workdir check raising RuntimeError) shows its traceback; a user error (a missing weights file)
  is one line. Both through main.py's own main(), before JAX."""
  script = ("import sys; sys.argv[0] = 'main.py'; import main; from fdnm_jax import run_config\n"
            "def boom(*a, **k): raise RuntimeError('internal boom')\n"
            "run_config.check_contract = boom\n"
            "main.app.run(main.main, flags_parser=main.parse_flags)\n")
  env = subprocesses.env(PYTHONPATH=os.pathsep.join([no_heavy_imports, subprocesses.REPO]))
  proc = subprocess.run([sys.executable, "-c", script, f"--config={TINY}", f"--workdir={tmp_path / 'a'}"],
                        cwd=subprocesses.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError: internal boom" in proc.stderr
  assert "error: " not in proc.stderr
  line = one_line_error(main_py(str(tmp_path / "b"), f"--config.model.pretrained={tmp_path / 'w.npz'}",
                                pythonpath=no_heavy_imports))
  assert f"model.pretrained=\"{tmp_path / 'w.npz'}\": no such file" in line
  assert not os.path.exists(tmp_path / "b")


def test_extract_prints_no_stray_none(finished, tmp_path):
  images = os.path.join(finished, "synthetic_data", "Visible", "1")
  proc = subprocesses.run_main(finished, "--mode=extract", f"--images={images}", "--modality=visible",
                               f"--out={tmp_path / 'feats'}", config=None)
  assert "None" not in [line.strip() for line in (proc.stdout + proc.stderr).splitlines()]
  assert os.path.isfile(tmp_path / "feats" / "features.npy")
