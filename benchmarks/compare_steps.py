"""Train-step time of config variants compiled in one process and timed in alternation.

On a shared or noisy machine two subprocesses run minutes apart see different loads; steps of several variants
timed in turn (A, B, C, C, B, A, ...) inside one process see the same load, so their ratios are the most reliable
comparison available. Each variant is a comma-separated list of `config` overrides applied to
`configs/default.py` at the given image size and batch (same batch layout and step as `train_step.py`); the empty
string is the default model.

  python benchmarks/compare_steps.py "" "model.spectral_transform=dft_matmul" "model.agp_stages=(),model.anm_stage=0"
  python benchmarks/compare_steps.py --size 384x144 --batch 16 --rounds 4 "" "model.spectral_transform=dft_matmul"
"""

import argparse
import ast
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _apply(config, overrides: str) -> None:
  """Sets each `a.b=value` of a comma-separated list (a value parses as a Python literal, else a string).

  Commas inside brackets belong to the value: "model.agp_stages=(1,2),model.anm_stage=0".
  """
  items, depth, start = [], 0, 0
  for i, ch in enumerate(overrides + ","):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      if overrides[start:i].strip():
        items.append(overrides[start:i].strip())
      start = i + 1
  for item in items:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path, leaf = key.split(".")
    node = config
    for name in path:
      node = node[name]
    if leaf not in node:
      raise KeyError(f"unknown config field {key!r}")
    node[leaf] = value


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("variants", nargs="+", help="comma-separated config overrides per variant")
  parser.add_argument("--size", default="288x144", help="HxW")
  parser.add_argument("--batch", type=int, default=16, help="global batch (multiple of 8)")
  parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
  args = parser.parse_args()

  from fdnm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_xla_flags()
  import train_step  # pylint: disable=g-import-not-at-top
  from fdnm_jax import sharding  # pylint: disable=g-import-not-at-top

  print("command:", shlex.join([sys.executable] + sys.argv))
  print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; load average at start: {os.getloadavg()[0]:.1f}; "
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}")
  height, width = (int(v) for v in args.size.split("x"))
  runs = []
  for variant in args.variants:
    config = train_step.benchmark_config(height, width, args.batch, frequency=True)
    _apply(config, variant)
    step = train_step.build_jax_step(config)
    batch = sharding.host_to_global(step.host, step.mesh)
    state, metrics = step.compiled(step.state, batch)  # warm-up
    runs.append({"variant": variant or "(default)", "step": step.compiled, "state": state, "batch": batch,
                 "times": [], "compile_s": step.compile_s, "loss": float(metrics["total"])})
  for r in range(args.rounds):
    for run in (runs if r % 2 == 0 else runs[::-1]):
      start = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      float(metrics["total"])
      run["times"].append(time.perf_counter() - start)
  base = min(runs[0]["times"])
  print("| variant | step best / median | images/s (best) | vs first | compile | first loss |")
  print("|---|---|---|---|---|---|")
  for run in runs:
    best = min(run["times"])
    print(f"| {run['variant']} | {best:.2f} / {np.median(run['times']):.2f} s | {args.batch / best:.2f} | "
          f"{base / best:.2f}x | {run['compile_s']:.1f} s | {run['loss']:.3f} |")
  print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
