"""Installs a requirements file into the running Python's environment with uv, or with pip where uv cannot.

  python tools/install.py requirements-dev.txt              # no bytecode (the test command: the tests write it)
  python tools/install.py requirements.txt --compile        # with bytecode (the demo command: one process)

pip unpacks and byte-compiles wheels one at a time: on a 2-core machine of the AVX-512 type `pip install --no-compile
-r requirements-dev.txt` took ~31 s in a new venv and uv ~7 s with an empty cache (docs/benchmarks.md, issue 17,
eleventh pass). uv (pinned: UV_PIN) is itself installed with pip, into the same environment.

uv does not read pip's configuration, and the machines here keep theirs there (a folder of wheels that holds the CPU
build of torch, local package indexes, a constraints file): `uv_options` hands pip's resolved configuration to uv, with
pip's rule for several indexes (every index's versions are candidates: `--index-strategy unsafe-best-match`), so
both install the same pinned versions from the same places. If installing uv or installing with it fails, the
requirements are installed by pip (and its error, if any, is the one shown).
"""

import argparse
import os
import shlex
import subprocess
import sys
from typing import Optional

UV_PIN = "uv==0.13.9"

# pip option -> uv option, for the pip settings that choose where packages come from.
_LIST_OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
                 "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
_FLAG_OPTIONS = {"no-index": "--no-index"}
# Later sections override earlier ones, as pip reads them: [global], then [install], then PIP_* variables.
_SECTION_ORDER = ("global", "install", ":env:")


def pip_settings(config_list: str) -> dict[str, str]:
  """pip's effective settings for `pip install` from the text `pip config list` prints (lines `section.key='value'`):
  for each key the value of the last section in _SECTION_ORDER that sets it. Other sections are ignored."""
  by_section: dict[str, dict[str, str]] = {}
  for line in config_list.splitlines():
    name, sep, value = line.partition("=")
    section, dot, key = name.strip().rpartition(".")
    if not sep or not dot or section not in _SECTION_ORDER:
      continue
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
      value = value[1:-1]
    by_section.setdefault(section, {})[key] = value
  settings: dict[str, str] = {}
  for section in _SECTION_ORDER:
    settings.update(by_section.get(section, {}))
  return settings


def uv_options(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
  """(uv pip install arguments, environment variables) equivalent to pip's `settings` (`pip_settings`).

  pip lists several values in one setting separated by white space (extra-index-url, find-links, ...): each becomes
  its own uv option. pip's `cert` becomes SSL_CERT_FILE. pip considers every index's versions, uv by default only
  the first index's that has the package: `--index-strategy unsafe-best-match` is pip's rule.
  """
  args = ["--index-strategy", "unsafe-best-match"]
  env = {}
  for key, option in _LIST_OPTIONS.items():
    for value in settings.get(key, "").split():
      args += [option, value]
  for key, option in _FLAG_OPTIONS.items():
    if settings.get(key, "").lower() in ("1", "true", "yes", "on"):
      args.append(option)
  if settings.get("cert"):
    env["SSL_CERT_FILE"] = settings["cert"]
  return args, env


def _run(cmd: list[str], env: Optional[dict[str, str]] = None) -> bool:
  print("+ " + shlex.join(cmd), flush=True)
  return subprocess.run(cmd, env=env, check=False).returncode == 0


def install(requirements: str, compile_bytecode: bool) -> int:
  """Installs `requirements` into sys.executable's environment (uv, else pip); returns the exit status."""
  pip = [sys.executable, "-m", "pip"]
  config = subprocess.run(pip + ["config", "list"], capture_output=True, text=True, check=False).stdout
  args, extra_env = uv_options(pip_settings(config))
  uv = [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", sys.executable, *args, "-r", requirements]
  if compile_bytecode:
    uv.append("--compile-bytecode")
  env = dict(os.environ)
  for key, value in extra_env.items():
    env.setdefault(key, value)
  if _run(pip + ["install", "-q", UV_PIN]) and _run(uv, env):
    return 0
  print(f"warning: installing with uv failed; installing {requirements} with pip instead", file=sys.stderr, flush=True)
  return 0 if _run(pip + ["install", "-q"] + ([] if compile_bytecode else ["--no-compile"]) + ["-r", requirements]) else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("requirements", help="a requirements file (requirements.txt, requirements-dev.txt)")
  parser.add_argument("--compile", action="store_true", help="write the installed packages' bytecode (pip's default)")
  ns = parser.parse_args()
  if not os.path.isfile(ns.requirements):
    print(f"error: no requirements file {ns.requirements!r} (run from the repository's root)", file=sys.stderr)
    return 1
  return install(ns.requirements, ns.compile)


if __name__ == "__main__":
  sys.exit(main())
