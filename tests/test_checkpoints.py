"""Checkpoints that fail well, and model selection.

Unit tests on tiny pytrees (no model): partial saves ignored and cleaned; an unreadable latest checkpoint named, moved
aside and replaced by the previous one; a shape mismatch naming the config field and both values; an error of our
own code not mistaken for a corrupt checkpoint; disk-full and read-only saves as one-line CheckpointErrors (a small
tmpfs where the machine allows mounting one, else an injected write error) with the last good checkpoint intact;
the best-scored checkpoint kept beside the latest by orbax's policies, across a reopen.

End to end on the tiny config: a finished run whose latest checkpoint is truncated resumes from the previous one and
ends with the numbers of an uninterrupted run; a full disk during training ends main.py with one line and a resume
continues to the uninterrupted run's numbers; a run with a validation split keeps the best step after later, worse
evaluations and reports both "last" and "best on validation".
"""

import errno
import json
import logging as py_logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import uuid

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fdnm_jax import checkpoints, eval_mode, train
from fdnm_jax.errors import CheckpointError
from tests import subprocesses
from tests.configs import tiny


def _ckpt_config(keep=3, async_save=False):
  return ml_collections.ConfigDict({"every_steps": 1, "keep": keep, "async_save": async_save})


def _state(width=8, classes=4, offset=0.0):
  """A tiny tree with FDNM's parameter names (a stem kernel of `width` channels, a classifier of `classes`)."""
  rng = np.random.default_rng(int(offset))
  return {"step": jnp.asarray(int(offset), jnp.int32),
          "params": {"visible_stem": {"conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, width)), jnp.float32)}},
                     "classifier": {"kernel": jnp.asarray(rng.normal(size=(width, classes)), jnp.float32)}},
          "batch_stats": {"bn": {"mean": jnp.full((width,), offset, jnp.float32)}},
          "opt_state": {"trace": jnp.asarray(rng.normal(size=(1000,)), jnp.float32)}}


def _save_steps(workdir, steps, ckpt_config=None, selection=None, scores=None):
  ckpts = checkpoints.TrainCheckpoints(workdir, ckpt_config or _ckpt_config(), selection)
  for i, s in enumerate(steps):
    ckpts.save(s, _state(offset=s), score=None if scores is None else scores[i])
  ckpts.wait()
  ckpts.close()


def _assert_tree_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _truncate_largest_data_file(step_folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_folder, "state")) for f in fs
           if "/d/" in os.path.join(d, f)]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  return victim


def test_partial_saves_are_ignored_and_cleaned(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [1, 2])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  os.makedirs(os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp-1234"))  # a crash mid-save (local file system).
  shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "5"))
  os.remove(os.path.join(ckpt_dir, "5", checkpoints.COMMIT_MARKER))  # a save that never committed (GCS-style).
  assert checkpoints.committed_steps(workdir) == [1, 2]
  assert checkpoints.resolve(workdir, None) == (workdir, 2)
  assert [os.path.basename(p) for p in checkpoints.partial_entries(workdir)] == ["3.orbax-checkpoint-tmp-1234", "5"]
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())  # a training run opening the folder cleans it.
  try:
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
    state, step = ckpts.restore_latest(checkpoints.abstract_like(_state()), lambda tree: "", fix="")
  finally:
    ckpts.close()
  assert step == 2
  _assert_tree_equal(state, _state(offset=2))


def test_unreadable_latest_checkpoint_is_named_moved_aside_and_the_previous_one_used(tmp_path, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4, 6])
  _truncate_largest_data_file(os.path.join(workdir, "checkpoints", "6"))
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  with caplog.at_level(py_logging.WARNING):
    state, step = ckpts.restore_latest(checkpoints.abstract_like(_state()), lambda tree: "", fix="")
  ckpts.close()
  assert step == 4
  _assert_tree_equal(state, _state(offset=4))
  moved = os.path.join(workdir, checkpoints.QUARANTINE, "6-unreadable")
  assert os.path.isfile(os.path.join(moved, checkpoints.COMMIT_MARKER))  # moved whole, not deleted.
  assert checkpoints.committed_steps(workdir) == [2, 4]
  warning = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(warning) == 1, caplog.text
  assert warning[0].startswith(f"checkpoint step 6 at {os.path.join(workdir, 'checkpoints', '6')} cannot be read (")
  assert f"moved it to {moved}" in warning[0]
  assert "Resuming from the checkpoint at step 4 instead: steps 5-6 (2 steps) will be retrained." in warning[0]
  assert ckpts.retrained == {"from": 4, "to": 6, "steps": 2, "moved": moved}


def test_the_only_checkpoint_unreadable_means_a_fresh_start(tmp_path, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [3])
  os.remove(os.path.join(workdir, "checkpoints", "3", "state", "_METADATA"))  # its metadata lost.
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  with caplog.at_level(py_logging.WARNING):
    state, step = ckpts.restore_latest(checkpoints.abstract_like(_state()), lambda tree: "", fix="")
  ckpts.close()
  assert state is None and step == 0
  assert "Resuming from scratch (no readable checkpoint left) instead: steps 1-3 (3 steps) will be retrained" in \
      caplog.text
  assert os.listdir(os.path.join(workdir, checkpoints.QUARANTINE)) == ["3-unreadable"]


def test_shape_mismatch_names_the_field_and_both_values_and_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [2])
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  target = checkpoints.abstract_like(_state(width=16))
  try:
    with pytest.raises(CheckpointError) as e:
      ckpts.restore_latest(target, lambda tree: checkpoints.model_field_differences(tree["params"], target["params"]),
                           fix="Use the run's config.")
  finally:
    ckpts.close()
  message = str(e.value)
  assert message.startswith(f"checkpoint step 2 at {os.path.join(workdir, 'checkpoints', '2')} does not fit this "
                            "config: ")
  assert "model.width: 8 in the checkpoint, 16 in this config" in message
  assert "first batch_stats/bn/mean: checkpoint (8,) float32 vs this config (16,) float32" in message
  assert message.endswith("Use the run's config.") and "\n" not in message
  assert checkpoints.committed_steps(workdir) == [2] and not os.path.exists(tmp_path / checkpoints.QUARANTINE)


def test_only_the_classifier_differs_names_the_number_of_identities(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [2])
  variables = {k: v for k, v in _state(classes=6).items() if k in ("params", "batch_stats")}
  with pytest.raises(CheckpointError, match=r"the classifier has 4 outputs in the checkpoint and 6 here"):
    checkpoints.restore_variables(
        checkpoints.step_path(workdir, 2), _mesh(), expected=lambda n: checkpoints.abstract_like(variables),
        fields=checkpoints.model_field_differences(checkpoints.state_metadata(checkpoints.step_path(workdir, 2))
                                                   ["params"], variables["params"]), fix="")


def _mesh():
  from fdnm_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))


def test_restore_variables_reads_params_and_bn_statistics_only(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [2])
  variables, num_classes = checkpoints.restore_variables(checkpoints.step_path(workdir, 2), _mesh())
  want = _state(offset=2)
  assert num_classes == 4 and set(variables) == {"params", "batch_stats"}
  _assert_tree_equal(variables, {"params": want["params"], "batch_stats": want["batch_stats"]})


def test_an_error_of_our_own_code_is_not_taken_for_a_corrupt_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  _save_steps(workdir, [2, 4])

  def buggy_restore(*args, **kwargs):
    raise RuntimeError("a bug in the restore path")

  monkeypatch.setattr(checkpoints, "restore", buggy_restore)
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  try:
    with pytest.raises(RuntimeError, match="a bug in the restore path"):  # re-raised with its traceback,
      ckpts.restore_latest(checkpoints.abstract_like(_state()), lambda tree: "", fix="")
  finally:
    ckpts.close()
  assert checkpoints.committed_steps(workdir) == [2, 4]  # and the readable checkpoint stays where it is.
  assert not os.path.exists(tmp_path / checkpoints.QUARANTINE)


def test_storage_errno_finds_disk_full_and_permission_errors_anywhere_in_the_exception():
  assert checkpoints.storage_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.a/0" in OCDBT database: Failed to write 540819 '
                           "bytes to file 7: No space left on device [os_error_code='28']")
  assert checkpoints.storage_errno(tensorstore) == errno.ENOSPC
  try:
    try:
      raise PermissionError(errno.EROFS, "Read-only file system")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert checkpoints.storage_errno(outer) == errno.EROFS
  assert checkpoints.storage_errno(ExceptionGroup("g", [ValueError("x"), OSError(errno.EACCES, "denied")])) == \
      errno.EACCES
  assert checkpoints.storage_errno(OSError(errno.ENOENT, "No such file")) is None
  assert checkpoints.storage_errno(ValueError("shape (3,) vs (4,)")) is None


def test_orbax_tracebacks_of_storage_errors_are_kept_out_of_the_log():
  checkpoints._quiet_storage_error_logs()  # pylint: disable=protected-access
  logger = py_logging.getLogger("absl")

  def record(message, exc=None, path="/site-packages/orbax/checkpoint/_src/x.py", level=py_logging.ERROR):
    return logger.makeRecord("absl", level, path, 1, message, (), (type(exc), exc, None) if exc else None)

  full = OSError(errno.ENOSPC, "No space left on device")
  assert not logger.filter(record("Failed to run 3 Handler Commit operations", full))
  assert not logger.filter(record("raised an exception: ... No space left on device [os_error_code='28']"))
  assert logger.filter(record("raised an exception: shape mismatch"))  # other orbax errors stay.
  assert logger.filter(record("disk full", full, path="/repo/fdnm_jax/train.py"))  # and everyone else's.
  assert logger.filter(record("No space left [os_error_code='28']", level=py_logging.WARNING))
  # The never-awaited read tasks of a checkpoint found unreadable (asyncio's records): dropped for that folder only.
  tasks = py_logging.getLogger("asyncio")
  checkpoints._known_unreadable("/runs/x/checkpoints/4")  # pylint: disable=protected-access
  read_error = ValueError('OUT_OF_RANGE: Error reading "params.a/0" in OCDBT database at local file '
                          '"/runs/x/checkpoints/4/state/": Requested byte range [0, 2299) is not valid')
  assert not tasks.filter(tasks.makeRecord("asyncio", py_logging.ERROR, "base_events.py", 1, "Task exception was "
                                           "never retrieved", (), (ValueError, read_error, None)))
  other = ValueError('OUT_OF_RANGE: Error reading "params.a/0" at local file "/runs/x/checkpoints/40/state/"')
  assert tasks.filter(tasks.makeRecord("asyncio", py_logging.ERROR, "base_events.py", 1, "Task exception was never "
                                       "retrieved", (), (ValueError, other, None)))
  # A failed save's partial folder is removed while its other write threads may still run: their "No such file"
  # errors about that folder are dropped, the same error about another step's folder is kept.
  checkpoints._known_failed_save("/runs/z/checkpoints/4")  # pylint: disable=protected-access
  gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
  assert not logger.filter(record("_SignalingThread.run() raised an exception: [Errno 2] No such file or directory: "
                                  "'/runs/z/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/"
                                  "array_metadatas/process_0'", gone))
  assert logger.filter(record("_SignalingThread.run() raised an exception: [Errno 2] No such file or directory: "
                              "'/runs/z/checkpoints/40.orbax-checkpoint-tmp/state/array_metadatas/process_0'", gone))


def test_only_the_aftermath_of_reported_errors_is_dropped_from_unraisable_exceptions(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  noise = checkpoints._ReportedErrorNoise()  # pylint: disable=protected-access

  def call_soon_threadsafe():  # where asyncio raises it for the callbacks of a failed save.
    raise RuntimeError("Event loop is closed")

  def elsewhere():
    raise RuntimeError("Event loop is closed")

  def read_error(path):
    def read():
      raise ValueError(f'OUT_OF_RANGE: Error reading "params.a/0" at local file "{path}/state/"')
    return read

  def unraisable(fn, obj=None):
    try:
      fn()
    except (RuntimeError, ValueError) as e:
      return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, object=obj,
                                   err_msg=None)

  async def read_coroutine():
    pass

  coroutine = read_coroutine()
  coroutine.close()
  monkeypatch.setattr(checkpoints, "_UNREADABLE_PATHS", {"/runs/y/checkpoints/6/"})  # as _known_unreadable records.
  noise.install()
  try:
    sys.unraisablehook(unraisable(call_soon_threadsafe))  # dropped,
    sys.unraisablehook(unraisable(read_error("/runs/y/checkpoints/6"), coroutine))  # dropped,
    kept = [unraisable(elsewhere), unraisable(call_soon_threadsafe, obj="a finalizer"),
            unraisable(read_error("/runs/y/checkpoints/60"), coroutine),  # another folder's read error,
            unraisable(read_error("/runs/y/checkpoints/6"))]  # not a coroutine's.
    for u in kept:
      sys.unraisablehook(u)
  finally:
    noise.uninstall()
  assert seen == kept and sys.unraisablehook == seen.append


# ----------------------------------------------------------------------------------------------------------------
# Disk full / read-only: a small tmpfs when the machine lets us mount one, else an injected write error.


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                          timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return proc.returncode == 0


def _umount(path):
  subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


@pytest.fixture
def small_disk():
  """(folder, mounted): a fresh 4 MiB tmpfs when mounting works here (root), else a plain folder (mounted False:
  the tests inject the write error instead)."""
  path = f"/tmp/fdnm_small_disk_{uuid.uuid4().hex[:8]}"
  mounted = _mount_tmpfs(path, "4m")
  try:
    yield path, mounted
  finally:
    if mounted:
      _umount(path)
    shutil.rmtree(path, ignore_errors=True)


def _fill(path, leave_bytes):
  """Fills the file system of `path` up to `leave_bytes` free; returns the filler file."""
  filler = os.path.join(path, "filler.bin")
  free = shutil.disk_usage(path).free - leave_bytes
  with open(filler, "wb") as f:
    while free > 0:
      chunk = min(free, 1 << 20)
      f.write(b"\0" * chunk)
      free -= chunk
  return filler


def _inject(monkeypatch, code):
  """Makes every checkpoint save raise the OSError `code` (what the file system would raise)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def failing_save(self, step, *args, **kwargs):
    raise ValueError(f"UNKNOWN: Error writing local file {self.directory}/{step}: {os.strerror(code)} "
                     f"[os_error_code='{code}']")

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_while_saving_is_one_line_and_the_last_good_checkpoint_stays_usable(small_disk, monkeypatch,
                                                                                       async_save):
  path, mounted = small_disk
  workdir = os.path.join(path, "run")
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config(async_save=async_save))
  ckpts.save(1, _state(offset=1))
  ckpts.wait()
  if mounted:
    filler = _fill(path, leave_bytes=16 << 10)  # 16 KiB left: not enough for the 4 KiB-block files of a save.
  else:
    _inject(monkeypatch, errno.ENOSPC)
  with pytest.raises(CheckpointError) as e:
    ckpts.save(2, _state(offset=2))
    ckpts.wait()  # an async save reports at the wait (or at the next save).
  ckpts.close()
  message = str(e.value)
  step2 = os.path.join(workdir, "checkpoints", "2")
  # Needed: (3*3*3*8 + 8*4 + 8 + 1000) float32 + one int32 = 5028 bytes = 4.9 KiB.
  assert re.fullmatch(
      rf"cannot save the checkpoint of step 2 to {re.escape(step2)}: no space left on device \(\d+\.\d [KMG]iB free "
      r"there; the checkpoint needs up to 4\.9 KiB, the train state before compression\)\. Free space on that disk "
      r"or move the workdir to a larger one; the checkpoints saved before are intact \(latest: step 1\) and "
      r"rerunning the same command resumes from it\.", message), message
  assert e.value.__cause__ is None  # one line: the orbax/TensorStore chain is not attached.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # the partial save removed, step 1 untouched.
  if mounted:
    os.remove(filler)
  monkeypatch.undo()
  again = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  try:
    state, step = again.restore_latest(checkpoints.abstract_like(_state()), lambda tree: "", fix="")
  finally:
    again.close()
  assert step == 1
  _assert_tree_equal(state, _state(offset=1))


@pytest.mark.parametrize("attempts", [1, 40])
def test_a_failed_saves_partial_folder_is_removed_while_late_writes_still_land_in_it(tmp_path, monkeypatch,
                                                                                     attempts):
  """close() after a failed async save: TensorStore's write threads can still add files to the save's tmp folder
  while and after it is removed (seen once under load: the folder outlived close). Here each of the first 3
  removals is followed by such a write (the folder re-created with a fragment): one attempt leaves the folder and
  says so; retrying removes it for good. The committed step 1 is untouched either way."""
  workdir = str(tmp_path / "run")
  committed = os.path.join(checkpoints.checkpoint_dir(workdir), "1")
  os.makedirs(committed)
  open(os.path.join(committed, "commit_success.txt"), "w").close()
  tmp = checkpoints.step_path(workdir, 2) + checkpoints.TMP_MARKER
  os.makedirs(tmp)
  path_type = type(checkpoints.epath.Path(tmp))
  rmtree, late_writes = path_type.rmtree, [3]

  def rmtree_then_a_late_write(self, *args, **kwargs):
    rmtree(self, *args, **kwargs)
    if late_writes[0] > 0 and str(self) == tmp:
      late_writes[0] -= 1
      os.makedirs(tmp)
      open(os.path.join(tmp, "fragment"), "w").close()

  monkeypatch.setattr(path_type, "rmtree", rmtree_then_a_late_write)
  gone = checkpoints._remove_tmp_of(workdir, 2, attempts=attempts, delay_s=0.0)  # pylint: disable=protected-access
  assert gone is (attempts > 3) and os.path.exists(tmp) is (attempts <= 3)
  assert late_writes[0] == max(0, 3 - attempts)
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == (["1"] if gone else ["1", os.path.basename(tmp)])
  assert os.listdir(committed) == ["commit_success.txt"]


def test_a_read_only_checkpoint_folder_is_one_line(small_disk, monkeypatch):
  path, mounted = small_disk
  workdir = os.path.join(path, "run")
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config())
  ckpts.save(1, _state(offset=1))
  if mounted:
    subprocess.run(["mount", "-o", "remount,ro", path], check=True, timeout=30)
  else:
    _inject(monkeypatch, errno.EROFS)
  try:
    with pytest.raises(CheckpointError) as e:
      ckpts.save(2, _state(offset=2))
  finally:
    ckpts.close()
    if mounted:
      subprocess.run(["mount", "-o", "remount,rw", path], check=True, timeout=30)
  assert str(e.value) == (
      f"cannot save the checkpoint of step 2 to {os.path.join(workdir, 'checkpoints', '2')}: read-only file system. "
      f"Make {os.path.join(workdir, 'checkpoints')} writable (or move the workdir); the checkpoints saved before are "
      "intact (latest: step 1) and rerunning the same command resumes from it.")
  assert checkpoints.committed_steps(workdir) == [1]


# ----------------------------------------------------------------------------------------------------------------
# Model selection: orbax's BestN beside LatestN.


def test_the_best_scored_checkpoint_is_kept_beside_the_latest_across_a_reopen(tmp_path):
  workdir = str(tmp_path)
  selection = checkpoints.Selection("validation", "mAP")
  _save_steps(workdir, [1, 2, 3, 4], _ckpt_config(keep=1), selection, scores=[30.0, 60.0, 40.0, 50.0])
  assert checkpoints.committed_steps(workdir) == [2, 4]  # LatestN(1) keeps 4, BestN(1) keeps 2.
  ckpts = checkpoints.TrainCheckpoints(workdir, _ckpt_config(keep=1), selection)  # a resumed run.
  try:
    assert ckpts.best() == (2, 60.0) and ckpts.scores() == {2: 60.0, 4: 50.0}
    ckpts.save(5, _state(offset=5), score=10.0)
    ckpts.save(6, _state(offset=6))  # a periodic checkpoint without a score (not a candidate).
    assert checkpoints.committed_steps(workdir) == [2, 6]
    assert ckpts.best() == (2, 60.0)
  finally:
    ckpts.close()
  # Scores of another split (a run that switched to select_on_test) never win.
  on_test = checkpoints.TrainCheckpoints(workdir, _ckpt_config(keep=1), checkpoints.Selection("test", "mAP"))
  try:
    assert on_test.best() is None
  finally:
    on_test.close()


def test_selection_split_and_labels():
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  source = sources.DataSource(name="x", protocol="regdb", train_visible=None, train_infrared=None, test_sets={},
                              directions=())
  with_val = sources.DataSource(name="x", protocol="regdb", train_visible=None, train_infrared=None, test_sets={},
                                directions=(), validation=source)
  assert sources.selection_split(with_val, config) is None  # no periodic evaluations.
  config.evals.every_steps = 2
  assert sources.selection_split(with_val, config) == "validation"
  assert sources.selection_split(source, config) is None  # no validation split: nothing selected.
  config.evals.select_on_test = True
  assert sources.selection_split(source, config) == "test" == sources.selection_split(with_val, config)
  assert train.selection_of(with_val, config) == checkpoints.Selection("test", "mAP")
  assert train._selected_label(checkpoints.Selection("test", "mAP")) == (  # pylint: disable=protected-access
      "best on test (selected on the test set: not a held-out result)")
  config.evals.select_metric = "vr_far_1"
  with pytest.raises(ValueError, match=r"config.evals.select_metric='vr_far_1': the test evaluations \(regdb "
                                       r"protocol\) report mAP, mINP, rank1"):
    train.selection_of(with_val, config)
  results = {"a": {"mAP": 20.0, "rank1": 1.0}, "b": {"mAP": 50.0, "rank1": 3.0}}
  assert train.selection_score(results, checkpoints.Selection("validation", "mAP")) == 35.0


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny config.


def _final_metrics(report):
  return {(d, k): v for d, r in report["settings"].items() for k, v in r.items() if not isinstance(v, list)}


@pytest.fixture
def reference(tiny_run):
  """One uninterrupted in-process run of the tiny config (4 steps, checkpoints at 2 and 4): the session's
  (tests/shared_runs.py); copy it to change it."""
  return tiny_run


def _assert_same_final_numbers(got, want):
  # Exactly: a resumed run replays the same batches through the same compiled programs from a state restored bit for
  # bit (float32 arrays), so its final numbers are the uninterrupted run's floats.
  assert _final_metrics(got) == _final_metrics(want)


def test_reading_a_checkpoint_puts_the_absl_loggers_level_back(reference, caplog):
  """Orbax is quieted while a checkpoint's metadata is read, and the absl logger has its own level again after:
  before absl parses its flags (a library user, a notebook, this test) its verbosity is not the level in effect,
  and putting the verbosity back silenced every later absl INFO line of the process (a resume's "Resumed from")."""
  workdir, _ = reference
  logger = absl_logging.get_absl_logger()
  with caplog.at_level(py_logging.INFO, logger="absl"):  # INFO, whatever an earlier test of this worker left.
    checkpoints.state_metadata(os.path.join(workdir, "checkpoints", "2"))
    assert logger.level == py_logging.INFO
    absl_logging.info("an INFO line after the read")
  assert "an INFO line after the read" in [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_a_finished_run_with_a_truncated_latest_checkpoint_retrains_from_the_previous_one(reference, tmp_path):
  source_dir, want = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(source_dir, workdir)
  _truncate_largest_data_file(os.path.join(workdir, "checkpoints", "4"))
  proc = subprocesses.run_main(workdir)  # main.py, as a user reruns the command.
  warnings = [line for line in proc.stderr.splitlines() if "cannot be read" in line]
  assert len(warnings) == 1 and f"checkpoint step 4 at {workdir}/checkpoints/4 cannot be read (" in warnings[0]
  assert "steps 3-4 (2 steps) will be retrained" in warnings[0], warnings[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-6000:]  # TensorStore's read errors are not dumped.
  assert os.listdir(os.path.join(workdir, checkpoints.QUARANTINE)) == ["4-unreadable"]
  assert checkpoints.committed_steps(workdir) == [2, 4]  # step 4 trained and saved again.
  with open(os.path.join(workdir, "results", "tiny.json")) as f:
    got = json.load(f)
  assert got["resume_fallback"]["from"] == 2 and got["resume_fallback"]["steps"] == 2
  _assert_same_final_numbers(got, want)


@pytest.mark.slow  # no training: the model's abstract state only (eval_shape).
def test_resuming_a_run_with_another_model_names_the_fields_and_both_values(reference):
  workdir, _ = reference
  config = tiny.get_config()
  config.model.width = 16
  config.model.stage_sizes = (1, 2, 1, 1)
  run = train.build_run(config, workdir, _mesh())
  ckpts = checkpoints.TrainCheckpoints(workdir, config.checkpoint)
  try:
    with pytest.raises(CheckpointError) as e:
      ckpts.restore_latest(run.abstract_state, lambda tree: checkpoints.model_field_differences(
          tree["params"], run.abstract_state.params), fix="Use the run's config.")
  finally:
    ckpts.close()
  message = str(e.value)
  assert "model.width: 8 in the checkpoint, 16 in this config" in message, message
  assert "model.stage_sizes: [1, 1, 1, 1] in the checkpoint, [1, 2, 1, 1] in this config" in message, message
  # The extra block: 3 conv kernels + 3 BN scales and biases (9 params), 3 BN means and variances, 9 momenta = 24.
  assert "24 only in this config's model, first batch_stats/layer2/block1/" in message, message
  assert checkpoints.committed_steps(workdir) == [2, 4]


def _limit_writes(pid, path, mounted):
  """From outside the training process: leave almost no space on `path` (tmpfs), or cap the size of the files the
  process `pid` may write (RLIMIT_FSIZE, which needs no privilege for one's own child)."""
  if mounted:
    return _fill(path, leave_bytes=256 << 10)  # metrics and event files still fit; a 1.3 MB checkpoint does not.
  import resource  # pylint: disable=g-import-not-at-top
  resource.prlimit(pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
  return None


@pytest.mark.slow
def test_main_on_a_full_disk_ends_in_one_line_and_a_resume_matches_an_uninterrupted_run(reference, small_disk,
                                                                                         tmp_path):
  path, mounted = small_disk
  if mounted:  # the 4 MiB default holds one tiny checkpoint and little more; give the run room for two.
    _umount(path)
    assert _mount_tmpfs(path, "16m")
  workdir, data = os.path.join(path, "run"), str(tmp_path / "synthetic_full")  # the data off the small disk.
  overrides = (f"--config.data.root={data}", "--config.evals.every_steps=2")
  cmd = [sys.executable, subprocesses.MAIN, f"--config={subprocesses.TINY}", f"--workdir={workdir}", *overrides]
  proc = subprocess.Popen(cmd, cwd=subprocesses.REPO, env=subprocesses.env(devices=1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # Read while the test polls: an unread pipe blocks the run once it holds 64 KiB. (A pipe, not a file: the
  # RLIMIT_FSIZE below would cap a stderr file too.)
  stderr = []
  reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()))
  reader.start()
  # The evaluation right after the step-2 checkpoint holds the run for seconds: the disk fills before step 4's save.
  step2 = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 600
  while not os.path.isdir(step2) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  filler = _limit_writes(proc.pid, path, mounted)
  proc.wait(timeout=600)
  reader.join(timeout=60)
  err = stderr[0]
  assert proc.returncode != 0, err[-4000:]
  assert "Traceback" not in err, err[-6000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, err[-4000:]
  assert errors[0].startswith(f"error: cannot save the checkpoint of step 4 to {workdir}/checkpoints/4: "), errors[0]
  assert "the checkpoints saved before are intact (latest: step 2)" in errors[0]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  if filler:
    os.remove(filler)
  config = tiny.get_config()
  config.data.root, config.evals.every_steps = data, 2
  got = train.train_and_evaluate(config, workdir)  # the resume, with room again.
  assert checkpoints.committed_steps(workdir) == [2, 4]
  _assert_same_final_numbers(got, reference[1])


@pytest.mark.slow
def test_model_selection_keeps_the_best_step_after_worse_evaluations_and_reports_both(tmp_path, monkeypatch):
  # Validation scores injected in order 30, 60, 40 at steps 2, 4, 6: step 4 is the best, the later step 6 worse;
  # with checkpoint.keep=1, LatestN alone would have deleted step 4.
  injected = iter([30.0, 60.0, 40.0])
  monkeypatch.setattr(train, "selection_score", lambda results, selection: next(injected))
  config = tiny.get_config()
  # 2 of 10 identities held out: training keeps tiny.py's 8 classes, so the train step is the session's tiny
  # program (a persistent compilation cache hit: 11 instead of 20 CPU-s for this run, 2 cores).
  config.synthetic.num_train_ids = 10
  config.data.num_val_ids = 2
  config.evals.every_steps = 2
  config.schedule.num_epochs = 3  # 6 steps.
  config.checkpoint.keep = 1
  workdir = str(tmp_path / "run")
  report = train.train_and_evaluate(config, workdir)
  assert checkpoints.committed_steps(workdir) == [4, 6]
  assert report["step"] == 6
  last, best = report["models"]
  assert last["label"] == "last" and last["step"] == 6 and last["settings"] == report["settings"]
  assert best == {"label": "best on validation", "step": 4, "selected_on": "validation", "selection_metric": "mAP",
                  "selection_score": 60.0, "settings": best["settings"]}
  assert report["model_selection"] == {"split": "validation", "metric": "mAP", "every_steps": 2,
                                       "kept_scores": {"4": 60.0, "6": 40.0}, "best_step": 4, "best_score": 60.0}
  with open(os.path.join(workdir, "results", "tiny.json")) as f:
    assert json.load(f)["models"] == json.loads(json.dumps(report["models"]))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [(r["step"], r["selection/validation_mAP"]) for r in rows if "selection/validation_mAP" in r] == [
      (2, 30.0), (4, 60.0), (6, 40.0)]
  # The best row is checkpoint 4 scored on the test protocol (the eval mode's independent restore of that step).
  step4 = eval_mode.evaluate_checkpoint(None, workdir, checkpoint="4")
  for d, r in best["settings"].items():
    for k in ("rank1", "mAP", "mINP"):
      assert r[k] == step4["settings"][d]["mean"][k], (d, k)
  printed = train.format_final_report(report)
  assert "last (step 6):" in printed and "best on validation (step 4, selected by validation mAP = 60.00):" in printed
  assert printed.count("| visible_to_infrared |") == 2
