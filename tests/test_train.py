"""End-to-end: train + evaluate the tiny config, resume, bad input (device-count invariance: tests/test_sharding.py).

Each test builds its own workdir under tmp_path; the slow ones run `main.py` in a subprocess
(a fresh JAX per run, as a user runs it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fdnm_jax import train
from fdnm_jax.errors import NonFiniteLossError
from tests import subprocesses
from tests.configs import tiny
from tests.rounding import EPS64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")


run_main = subprocesses.run_main


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_rows(workdir):
  return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/total" in r]


def final_metrics(workdir, name="tiny"):
  with open(os.path.join(workdir, "results", f"{name}.json")) as f:
    report = json.load(f)
  return {(d, k): v for d, r in report["settings"].items() for k, v in r.items() if not isinstance(v, list)}


@pytest.fixture
def trained(tiny_run):
  """One uninterrupted in-process run of the tiny config (4 steps): the session's (tests/shared_runs.py)."""
  return tiny_run


@pytest.mark.slow
def test_run_writes_config_metrics_checkpoints_and_results(trained):
  workdir, report = trained
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["agp_stages"] == [1, 2]
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    for key in ("train/total", "train/id", "train/triplet", "train/cnm", "train/lr", "train/images_per_sec",
                "train/grad_norm"):
      assert np.isfinite(r[key]), key
  # lr: warm-up epoch 0 -> base * 1/1, epoch 1 -> decayed x0.1 (decay_epochs=(1,), 2 steps per epoch). The host
  # logs base_lr * factor in Python floats (optim.lr_factor_fn on an int step): base * 0.1 is within two float64
  # roundings of base / 10.
  base = tiny.get_config().optim.base_lr
  np.testing.assert_allclose([r["train/lr"] for r in rows], [base, base, base / 10, base / 10],
                             rtol=4 * EPS64)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert set(report["settings"]) == {"visible_to_infrared", "infrared_to_visible"}
  for r in report["settings"].values():
    assert 0 <= r["mINP"] <= r["mAP"] <= 100 and r["rank1"] <= r["rank5"] <= r["rank10"] <= r["rank20"] <= 100
    assert r["num_query"] == r["num_gallery"] == 16  # 4 test ids x 4 images per modality.
  assert final_metrics(workdir) == {(d, k): v for d, r in report["settings"].items()
                                    for k, v in r.items() if not isinstance(v, list)}


@pytest.mark.slow
def test_rerun_of_a_finished_workdir_does_not_train_again(trained, tmp_path):
  workdir, report = str(tmp_path / "run"), trained[1]
  shutil.copytree(trained[0], workdir)
  again = train.train_and_evaluate(tiny.get_config(), workdir)
  assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4]  # no new train rows.
  assert again["settings"] == report["settings"]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted_run(trained, tmp_path):
  """kill -9 after step 3 was logged (the last checkpoint is step 2's), resume: the numbers are the uninterrupted
  run's, and metrics.jsonl holds one row per logged step (the killed run's step-3 row is dropped, then logged again
  by the resumed run) with a record of the resume."""
  reference, _ = trained
  workdir = str(tmp_path / "killed")
  env = subprocesses.env(devices=1)
  # An evaluation right after step 3 is logged holds the run there for seconds: the kill lands after the step-2
  # checkpoint and the step-3 row, before the step-4 checkpoint (evaluation does not change the trajectory).
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), f"--config={TINY}",
                           f"--workdir={workdir}", "--config.evals.every_steps=3"], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if os.path.exists(metrics) and 3 in [r["step"] for r in train_rows(workdir)]:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2")), "the run never wrote its step-2 checkpoint"
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "4")), "the run finished before the kill"
  assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3]  # step 3 is logged beyond the checkpoint.
  config = tiny.get_config()
  config.evals.every_steps = 3
  train.train_and_evaluate(config, workdir)  # the resume (in this process: the kill is what needs main.py).
  # Exactly: steps 3-4 run the same compiled programs as the uninterrupted run's on the same batches, from the
  # step-2 state restored bit for bit (float32 arrays), so every number is the same float (on either CPU type).
  assert final_metrics(workdir) == final_metrics(reference)
  rows = read_jsonl(metrics)
  assert [r["step"] for r in train_rows(workdir)] == [1, 2, 3, 4]
  test_rows = [r["step"] for r in rows if "test/visible_to_infrared/mAP" in r]
  assert test_rows == [3, 4]  # the periodic evaluation at step 3 and the final one, once each.
  (event,) = [r for r in rows if "event" in r]
  assert event["event"] == "resumed" and event["step"] == 2 and event["dropped_rows"] >= 1
  assert [r["train/total"] for r in train_rows(workdir)] == [r["train/total"] for r in train_rows(reference)]


def test_non_finite_terms_are_named_in_the_order_the_step_computes_them():
  nan, inf = float("nan"), float("inf")
  # Every term NaN (metrics come back from the device with their keys sorted): the ID loss is computed first.
  everything = {k: nan for k in ("cnm", "grad_norm", "id", "ortho", "total", "triplet")}
  with pytest.raises(NonFiniteLossError, match=r"at step 7: term 'id' is nan, the first to go bad") as e:
    train.check_finite(everything, 7)
  assert "(id=nan, triplet=nan, cnm=nan, ortho=nan, total=nan, grad_norm=nan)" in str(e.value)
  # The ID loss finite, the triplet and everything after it not: the triplet went bad first.
  with pytest.raises(NonFiniteLossError, match=r"term 'triplet' is inf"):
    train.check_finite({"cnm": nan, "grad_norm": nan, "id": 2.0, "ortho": 0.0, "total": nan, "triplet": inf}, 1)
  with pytest.raises(NonFiniteLossError, match=r"term 'grad_norm' is nan"):  # finite loss, gradient overflow
    train.check_finite({"cnm": 1.0, "grad_norm": nan, "id": 2.0, "ortho": 0.0, "total": 3.0, "triplet": 0.5}, 1)
  train.check_finite({"cnm": 1.0, "grad_norm": 5.0, "id": 2.0, "ortho": 0.0, "total": 3.0, "triplet": 0.5}, 1)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_term_and_keeps_what_was_written(tmp_path):
  workdir = str(tmp_path / "nan")
  proc = run_main(workdir, "--config.optim.base_lr=1e30", "--config.optim.head_lr=1e30",
                  "--config.checkpoint.every_steps=1", check=False)
  assert proc.returncode != 0
  err = proc.stderr
  assert "non-finite loss at step 2" in err and "Traceback" not in err, err[-3000:]
  assert "term '" in err
  assert [r["step"] for r in train_rows(workdir)] == [1]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]


def test_unknown_config_key_is_rejected_with_its_name(tmp_path):
  proc = run_main(str(tmp_path / "w"), "--config.model.no_such_field=3", check=False)
  assert proc.returncode != 0
  assert "no_such_field" in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("dataset, words", [("sysu", "--config.data.root=/path/to/SYSU-MM01"),
                                            ("llcm", "--config.data.root=/path/to/LLCM"),
                                            ("regdb", "--config.data.root=/path/to/RegDB"),
                                            ("market", 'dataset="market": expected a known data set')])
def test_data_sets_without_data_fail_with_a_clear_message(tmp_path, dataset, words):
  proc = run_main(str(tmp_path / "w"), f"--config.dataset={dataset}", check=False)
  assert proc.returncode != 0
  assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _write_probe_as_nobody(path, conn):
  """Child process: drop root (which ignores permission bits) and try the workdir check."""
  try:
    if os.getuid() == 0:
      os.setgid(65534)
      os.setuid(65534)
    train.ensure_writable_dir(path)
    conn.send("no error")
  except PermissionError as e:
    conn.send(str(e))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  import multiprocessing as mp
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  os.chmod(tmp_path, 0o755)
  ctx = mp.get_context("fork")
  parent, child = ctx.Pipe()
  p = ctx.Process(target=_write_probe_as_nobody, args=(str(locked / "run"), child))
  p.start()
  p.join(60)
  # The child only makes os calls (no JAX), so forking the multithreaded test process is safe here; poll so a
  # child that died without answering fails the test instead of blocking it.
  assert parent.poll(10), f"the probe process sent nothing (exit code {p.exitcode})"
  message = parent.recv()
  assert "is not a writable folder" in message and "--workdir" in message, message


def test_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(PermissionError, match="is not a writable folder"):
    train.ensure_writable_dir(str(f))
