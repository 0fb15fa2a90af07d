"""fdnm_jax/process_exit.py: a process ended without the interpreter's teardown still does everything a normal exit
does before it (threads joined, atexit handlers run, Python's and the C library's buffered output written) and
exits with the status and message sys.exit would give."""

import os
import subprocess
import sys

import pytest

from fdnm_jax import process_exit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that leaves work for each step of a normal exit, then ends with exit_without_teardown(3).
CHILD = r"""
import atexit, concurrent.futures, ctypes, sys, threading, time
from fdnm_jax import process_exit
out = sys.argv[1]
def late_write(name, delay):
  time.sleep(delay)
  with open(f"{out}/{name}", "w") as f:
    f.write("done")
threading.Thread(target=late_write, args=("thread", 0.3)).start()  # non-daemon: a normal exit waits for it.
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(late_write, "pool", 0.3)  # never shut down: the interpreter's exit hook stops the pool.
atexit.register(late_write, "atexit", 0.0)
sys.stdout.write("python line, no newline")  # block-buffered: stdout is a pipe.
ctypes.CDLL(None).printf(b"|native printf")  # the C library's own stdout buffer.
process_exit.exit_without_teardown(3)
print("not reached")
"""


def test_exit_without_teardown_waits_runs_atexit_flushes_and_keeps_the_status(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # which would unbuffer C's stdout too.
  proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["atexit", "pool", "thread"]
  assert all((tmp_path / name).read_text() == "done" for name in ("atexit", "pool", "thread"))
  assert proc.stdout == "python line, no newline|native printf"


@pytest.mark.parametrize("code", [None, 0, 2, "error: a message"])
def test_the_status_and_message_are_those_of_sys_exit(code):
  def run(call):
    return subprocess.run([sys.executable, "-c", f"import sys; from fdnm_jax import process_exit; {call}({code!r})"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  got, want = run("process_exit.exit_without_teardown"), run("sys.exit")
  assert (got.returncode, got.stderr) == (want.returncode, want.stderr)
  assert want.returncode == (1 if isinstance(code, str) else code or 0)
