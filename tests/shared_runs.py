"""Finished runs trained once per test session and shared by the tests that only read them.

The first test process (an xdist worker, or the only process) that asks for a run trains it in the session folder
(`session_dir()`: made by the session's first process in tests/conftest.py, removed when the session ends) under an
exclusive file lock; the other processes wait on the lock and reuse the finished folder. A run is handed out only
while its files hash as they did when it finished: a test that wrote into it makes the next reader fail, naming the
files, instead of passing against a changed reference. Copy a run (`shutil.copytree`) to change it.
"""

import fcntl
import hashlib
import json
import os
import shutil
from typing import Any, Callable

SESSION_DIR_ENV = "FDNM_TEST_SESSION_DIR"


def session_dir() -> str:
  """The test session's own folder (tests/conftest.py makes it and sets FDNM_TEST_SESSION_DIR)."""
  path = os.environ.get(SESSION_DIR_ENV)
  if not path or not os.path.isdir(path):
    raise RuntimeError(f"{SESSION_DIR_ENV} is not a folder ({path!r}): run the tests with pytest from the repository "
                       "root, whose tests/conftest.py makes it")
  return path


def file_digests(root: str) -> dict[str, str]:
  """{path relative to `root`: sha256 of the file's bytes} of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def changed_files(want: dict[str, str], got: dict[str, str]) -> list[str]:
  """The paths added, removed or changed from `want` to `got` (sorted)."""
  return sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))


def shared_run(name: str, train: Callable[[str], Any]) -> tuple[str, Any]:
  """(workdir, value) of the session's run `name`: made by `value = train(workdir)` in the first process that asks
  for it; `value` (JSON: e.g. the report train_and_evaluate returned) is kept beside the workdir, not in it.

  Raises AssertionError when its files differ from those it finished with (a test wrote into it).
  """
  root = os.path.join(session_dir(), "runs", name)
  digests_path, value_path = root + ".sha256.json", root + ".value.json"
  os.makedirs(os.path.dirname(root), exist_ok=True)
  with open(root + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if train() raises.
    if not os.path.exists(digests_path):  # not (or not completely) made yet: a failed attempt starts over.
      if os.path.exists(root):
        shutil.rmtree(root)
      with open(value_path, "w") as f:
        json.dump(train(root), f)
      with open(digests_path + ".tmp", "w") as f:
        json.dump(file_digests(root), f)
      os.replace(digests_path + ".tmp", digests_path)
    with open(digests_path) as f:
      want = json.load(f)
    with open(value_path) as f:
      value = json.load(f)
  changed = changed_files(want, file_digests(root))
  assert not changed, (f"the shared run {root} was changed by an earlier test (copy it to change it): "
                       f"{changed[:10]}")
  return root, value


def _train_tiny(workdir: str) -> dict:
  from fdnm_jax import train  # pylint: disable=g-import-not-at-top
  from tests.configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(tiny_config.get_config(), workdir)


def tiny() -> tuple[str, dict]:
  """(workdir, the report train_and_evaluate returned) of the session's finished run of tests/configs/tiny.py (4
  steps, checkpoints 2 and 4, results/tiny.json, its synthetic data in synthetic_data/)."""
  return shared_run("tiny", _train_tiny)
