"""Where a config's jitted train step spends its time on the CPU: XLA thunk time per fusion, from a profiler trace.

Builds the step as benchmarks/train_step.py does (`build_jax_step`: one-device mesh, the state donated, a random
batch of the config's P x K shape), runs `--warmup` steps, then traces `--steps` steps with `jax.profiler` and sums
the duration of every XLA thunk (fusions, convolutions, FFTs) over the traced steps. Printed per step (ms): the
wall time untraced and traced (the profiler slows the step), the summed thunk time (on 2 cores thunks overlap, so
it can exceed the wall time), the time per thunk kind (the name before its first dot: `fft`, `ynn_fusion`,
`transpose_copy_fusion`, ...) and the `--top` single thunks. `--hlo=FILE` writes the compiled HLO so a fusion's
ops can be read (`%name = ... calls=%fused_computation.N`).

  python benchmarks/step_profile.py                                   # the README demo (configs/synthetic.py)
  python benchmarks/step_profile.py --set 'model.agp_stages=(),model.anm_stage=0'   # without AGP and ANM
  python benchmarks/step_profile.py --config=configs/regdb.py --steps=3
"""

import argparse
import collections
import glob
import gzip
import json
import os
import shlex
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _thunk_times(trace_dir: str) -> collections.Counter:
  """Summed duration (us) of each XLA thunk in the trace (host-side Python and executor frames left out)."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") == "X" and not name.startswith(("$", "Thunk", "Pjit", "Common", "Slinky", "np.")):
      totals[name] += event.get("dur", 0)
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--set", default="", help="comma-separated config overrides a.b=value (compare_steps.py's form)")
  parser.add_argument("--classes", type=int, default=300, help="identities of the ID loss")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--hlo", default="", help="write the compiled step's HLO text here")
  args = parser.parse_args()

  from fdnm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_xla_flags()
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import compare_steps, train_step  # pylint: disable=g-import-not-at-top
  from launch import trials  # pylint: disable=g-import-not-at-top
  from fdnm_jax import sharding  # pylint: disable=g-import-not-at-top

  config = trials.load_config(args.config)
  compare_steps._apply(config, args.set)  # pylint: disable=protected-access
  train_step.NUM_CLASSES = args.classes
  step = train_step.build_jax_step(config)
  state, batch = step.state, sharding.host_to_global(step.host, step.mesh)

  def run(n: int) -> float:
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = step.compiled(state, batch)
      float(metrics["total"])
    return (time.perf_counter() - start) / n

  run(args.warmup)
  untraced = run(args.steps)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      traced = run(args.steps)
    totals = _thunk_times(trace_dir)
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(step.compiled.as_text())
  kinds = collections.Counter()
  for name, us in totals.items():
    kinds[name.split(".")[0]] += us
  per_step = lambda us: us / args.steps / 1000.0
  print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; avx512f: "
        f"{'yes' if 'avx512f' in open('/proc/cpuinfo').read() else 'no'}; compile {step.compile_s:.1f} s")
  print(f"per step: {1000 * untraced:.1f} ms untraced, {1000 * traced:.1f} ms traced, "
        f"{per_step(sum(totals.values())):.1f} ms of thunks (summed over threads)")
  print("\nms/step  thunk kind")
  for name, us in kinds.most_common(15):
    print(f"{per_step(us):7.2f}  {name}")
  print(f"\nms/step  thunk (top {args.top})")
  for name, us in totals.most_common(args.top):
    print(f"{per_step(us):7.2f}  {name}")


if __name__ == "__main__":
  main()
