"""SIGTERM mid-run: the run saves a checkpoint at the current step, exits 0, and a restart finishes with the
metrics of an uninterrupted run."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fdnm_jax import train
from tests import subprocesses
from tests.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs", "tiny.py")


def final_metrics(workdir):
  with open(os.path.join(workdir, "results", "tiny.json")) as f:
    report = json.load(f)
  return {(d, k): v for d, r in report["settings"].items() for k, v in r.items() if not isinstance(v, list)}


def train_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "train/total" in r]


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_the_restart_matches_an_uninterrupted_run(tiny_run, tmp_path,
                                                                                             caplog):
  reference = tiny_run[0]  # the session's uninterrupted tiny run (tests/shared_runs.py).

  workdir = str(tmp_path / "preempted")
  env = subprocesses.env(devices=1)
  # No periodic checkpoints (only the final one and the preemption's); an evaluation after step 2 holds the
  # run for seconds, so the signal sent once step 2 is logged lands before the last step.
  cmd = [sys.executable, "main.py", f"--config={TINY}", f"--workdir={workdir}", "--config.checkpoint.every_steps=0",
         "--config.evals.every_steps=2"]
  # Its output goes to a file: a pipe nobody reads while the test polls would block the run once it holds 64 KiB.
  log = tmp_path / "stderr.txt"
  with open(log, "w") as stderr:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if os.path.exists(metrics) and 2 in train_steps(workdir):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=600)
  err = log.read_text()
  assert proc.returncode == 0, err[-4000:]
  match = re.search(r"Preempted: saved the checkpoint at step (\d+) to (\S+);", err)
  assert match, err[-4000:]
  step = int(match.group(1))
  assert 2 <= step < 4, "the signal did not land mid-run"
  assert match.group(2) == os.path.join(workdir, "checkpoints", str(step))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]  # only the preemption saved.
  assert train_steps(workdir) == list(range(1, step + 1))
  with open(os.path.join(workdir, "results", "tiny.json")) as f:  # the step-2 evaluation's; no final one.
    assert json.load(f)["step"] == 2

  # The restart, in this process (the signal is what needs main.py): the same config as `cmd`.
  config = tiny.get_config()
  config.checkpoint.every_steps, config.evals.every_steps = 0, 2
  with caplog.at_level(logging.INFO, logger="absl"):  # whatever level an earlier test of this worker left it at.
    train.train_and_evaluate(config, workdir)
  assert f"Resumed from the checkpoint at step {step}" in [r.getMessage() for r in caplog.records]
  assert train_steps(workdir) == [1, 2, 3, 4]
  # Exactly: the restart runs the same compiled programs on the same batches from the state restored bit for bit.
  assert final_metrics(workdir) == final_metrics(reference)


def test_watch_turns_sigterm_into_a_flag_and_restores_the_previous_handler():
  previous = signal.getsignal(signal.SIGTERM)
  watch = train.PreemptionWatch()
  try:
    assert not watch.reached(1, manager=None)
    os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only sets the flag.
    assert watch.reached(2, manager=None)
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGTERM) == previous
