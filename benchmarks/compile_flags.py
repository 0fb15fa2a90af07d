"""Compile time of the train step and init under XLA CPU flag sets, each in a fresh process without a cache.

For each flag set (added to the CPU flags main.py uses) and compile mode (JAX_DISABLE_MOST_OPTIMIZATIONS 1, the
test suite's cheap mode, or 0, the optimising compiler main.py runs with), a child process builds the run of a
config, compiles `init` and the train step as `train._train_loop` does (one-device mesh), takes step 1 and then
`--steps` timed steps on the same batch, and prints the backend compile seconds of each program, the step-1 losses
(to see that a flag changes rounding, not the maths) and the mean step time.

  python benchmarks/compile_flags.py                       # tests/configs/tiny.py, cheap mode, two flag sets
  python benchmarks/compile_flags.py --config=configs/synthetic.py --optimize=0 --steps=20
  python benchmarks/compile_flags.py --flags="" --flags="--xla_cpu_use_fusion_emitters=false"
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import collections, importlib.util, json, sys, time
sys.path.insert(0, {repo!r})
import jax
compile_s = collections.Counter()
def listener(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    compile_s[kwargs.get("fun_name", "?")] += duration
jax.monitoring.register_event_duration_secs_listener(listener)
from fdnm_jax import tensorflow_import
tensorflow_import.load()
import ml_collections
from fdnm_jax import sharding, train
from input_pipeline import pipeline
spec = importlib.util.spec_from_file_location("config_module", {config!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
mesh = sharding.make_mesh(ml_collections.ConfigDict({{"data": 1, "fsdp": 1}}), devices=jax.devices()[:1])
run = train.build_run(config, {workdir!r}, mesh)
state = run.init_state()
step = jax.jit(train.make_train_step(run.model, run.tx, config.loss),
               in_shardings=(run.state_sharding, sharding.batch_sharding(mesh)),
               out_shardings=(run.state_sharding, sharding.replicated(mesh)), donate_argnums=0)
batches = pipeline.train_batches(run.source.train_visible, run.source.train_infrared, config.input,
                                 seed=config.seed, start_step=0)
keys = ("visible", "infrared", "visible_labels", "infrared_labels")
batch = sharding.host_to_global({{k: v for k, v in next(batches).items() if k in keys}}, mesh)
state, metrics = step(state, batch)
first = {{k: float(v) for k, v in jax.device_get(metrics).items()}}
start = time.perf_counter()
for _ in range({steps}):
  state, metrics = step(state, batch)
jax.block_until_ready(metrics)
step_ms = 1000 * (time.perf_counter() - start) / max({steps}, 1)
print(json.dumps({{"compile_s": dict(compile_s), "step1": first, "step_ms": step_ms}}))
"""


def run_variant(config: str, flags: str, optimize: str, steps: int, workdir: str) -> dict:
  """One child process: returns its JSON line (compile seconds per program, step-1 metrics, step ms)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_DISABLE_MOST_OPTIMIZATIONS=optimize)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["XLA_FLAGS"] = " ".join(["--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"] + flags.split())
  code = _CHILD.format(repo=REPO, config=os.path.abspath(config), workdir=workdir, steps=steps)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise SystemExit(f"variant {flags!r} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(REPO, "tests", "configs", "tiny.py"))
  parser.add_argument("--flags", action="append", help="XLA flags of one variant (repeat the option)")
  parser.add_argument("--optimize", default="1", choices=("0", "1"), help="JAX_DISABLE_MOST_OPTIMIZATIONS")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after step 1")
  parser.add_argument("--workdir", default="/tmp/fdnm_compile_flags", help="where the config's data is generated")
  args = parser.parse_args()
  variants = args.flags if args.flags is not None else ["", "--xla_cpu_use_fusion_emitters=false"]
  print("command: python " + " ".join(sys.argv))
  print(f"config {args.config}, JAX_DISABLE_MOST_OPTIMIZATIONS={args.optimize}, {args.steps} timed steps")
  for flags in variants:
    out = run_variant(args.config, flags, args.optimize, args.steps, args.workdir)
    compiled = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(out["compile_s"].items()) if v >= 0.05)
    s1 = out["step1"]
    print(f"[{flags or 'main.py flags only'}] compile: {compiled}; step 1: total {s1['total']:.7f}, "
          f"grad_norm {s1['grad_norm']:.6f}; {out['step_ms']:.1f} ms/step")


if __name__ == "__main__":
  main()
