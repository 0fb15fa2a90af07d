"""Images/s of the jitted FDNM train step against the same model and step in PyTorch eager, in one run.

JAX: `fdnm_jax.train.make_train_step` on `configs/default.py` (full FDNM: ResNet-50, AGP after layers 1-2, ANM after
layer4, last stride 1, float32), jitted as `train._train_loop` does it (state and batch shardings of a one-device
mesh, the state donated), each step fed from host NumPy through `sharding.host_to_global`. Torch:
`benchmarks/torch_fdnm.py` (the same network, losses and SGD; `tests/test_torch_reference.py` checks they agree),
eager, NCHW and channels_last. A batch of B images is B/2 visible + B/2 infrared, B/8 identities x 4 per modality
(48 = 6 ids x (4+4)); 395 classes (SYSU-MM01). Random normal images.

Every (size, batch, side) runs in its own subprocess (its own peak RSS), the sides one after the other for each
setting, so JAX and torch see the same load; the load average is printed with each row (other jobs on the machine
change the numbers). Each subprocess first measures its library's float32 matmul peak (best of several
2048 x 2048 x 2048 matmuls); the table uses the larger of the two as the machine's peak.

- images/s: B / the fastest of `--steps` steps after one warm-up step (JAX: after compilation), and B / the
  median step; on a machine shared with other jobs the fastest step is the least disturbed one. CPU s per step:
  user + system CPU time of the process per step (median).
- compile: JAX lower + compile of the step; torch: the first (warm-up) step.
- model FLOPs per image: 3 x the forward convolution and matmul FLOPs (2 per multiply-add, counted from the
  forward's jaxpr; the FFTs and elementwise math are not counted), the usual MFU convention.
- MFU = model FLOPs/s / measured matmul peak.
- AGP+ANM share: 1 - t(step without AGP and ANM) / t(step) (fastest steps), the same model with agp_stages=() and
  anm_stage=0 (its head then has one branch instead of two nuance branches and no L_cnm, a small part of the step).
  The notes give the same ratio in model FLOPs (ANM's two 2048 x 2048 amplitude convolutions are most of it): the
  time share cannot go below it unless AGP/ANM run faster per FLOP than the backbone.
- Sides: jax (`model.spectral_transform="fft"`, jnp.fft, the default), jax_dft (`"dft_matmul"`: the FFTs as DFT
  matrix products), torch (NCHW), torch_cl (channels_last).

  python benchmarks/train_step.py                      # 288x144 and 384x144, batch 16 and 48, 5 steps
  python benchmarks/train_step.py --quick              # 288x144, batch 16, 2 steps
  python benchmarks/train_step.py --sizes 288x144 --batches 16 --steps 3 --sides jax,torch_cl
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_CLASSES = 395
K = 4  # images per identity per modality
MATMUL_N = 2048
SIDES = ("jax", "jax_dft", "torch", "torch_cl")
JAX_SIDES = ("jax", "jax_dft")


def benchmark_config(height: int, width: int, batch: int, frequency: bool = True, spectral_transform: str = "fft"):
  """`configs/default.py` at H x W with a batch of `batch` images (B/8 identities x 4 per modality)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.input.height, config.input.width = height, width
  if batch % (2 * K):
    raise ValueError(f"--batches {batch}: expected a multiple of {2 * K} (identities x {K} per modality x 2)")
  config.input.num_ids_per_batch = batch // (2 * K)
  config.input.num_instances = K
  config.model.spectral_transform = spectral_transform
  if not frequency:
    config.model.agp_stages = ()
    config.model.anm_stage = 0
  return config


def _host_batch(config) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b = config.input.num_ids_per_batch * K
  shape = (b, config.input.height, config.input.width, 3)
  labels = np.repeat(np.arange(config.input.num_ids_per_batch), K).astype(np.int32)
  return {"visible": rng.standard_normal(shape, np.float32), "infrared": rng.standard_normal(shape, np.float32),
          "visible_labels": labels, "infrared_labels": labels}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _best_time(fn, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _conv_dot_flops(jaxpr) -> float:
  """2 x multiply-adds of every conv_general_dilated and dot_general in a (closed) jaxpr, sub-jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _conv_dot_flops(inner)
  return total


class JaxStep(NamedTuple):
  """A compiled benchmark step: `compiled(state, global batch) -> (state, metrics)`, its initial state, the FDNM
  module, the host batch (`_host_batch`), the mesh and the seconds spent in lower + compile."""
  compiled: Any
  state: Any
  model: Any
  host: dict[str, np.ndarray]
  mesh: Any
  compile_s: float


def build_jax_step(config) -> JaxStep:
  """The benchmarked JAX step of `config`, compiled as `train._train_loop` does (one-device mesh shardings, the
  state donated). The caller configures XLA flags first."""
  import jax  # pylint: disable=g-import-not-at-top
  from fdnm_jax import optim, sharding, train  # pylint: disable=g-import-not-at-top
  from fdnm_jax.models.fdnm import fdnm_from_config  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  model = fdnm_from_config(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config.optim, config.schedule, steps_per_epoch=100)
  shape = (1, config.input.height, config.input.width, 3)
  init = lambda rng: train.create_train_state(model, tx, rng, shape)
  state_sharding = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
  host = _host_batch(config)
  step_fn = jax.jit(train.make_train_step(model, tx, config.loss),
                    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, sharding.host_to_global(host, mesh)).compile()
  return JaxStep(compiled, state, model, host, mesh, time.perf_counter() - start)


def _run_jax(config, steps: int, cpu_flags: bool = True) -> dict[str, Any]:
  from fdnm_jax import platform  # pylint: disable=g-import-not-at-top
  added = platform.configure_xla_flags() if cpu_flags else []
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdnm_jax import sharding  # pylint: disable=g-import-not-at-top

  a = jnp.asarray(np.random.default_rng(1).standard_normal((MATMUL_N, MATMUL_N), np.float32))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  peak = 2.0 * MATMUL_N ** 3 / _best_time(lambda: matmul(a).block_until_ready(), 5)

  compiled, state, model, host, mesh, compile_s = build_jax_step(config)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  forward = jax.make_jaxpr(lambda v, x, y: model.apply(v, x, y, train=True, mutable=["batch_stats"]))(
      variables, host["visible"], host["infrared"])
  flops_per_image = 3 * _conv_dot_flops(forward.jaxpr) / (2 * len(host["visible_labels"]))

  times, cpu = [], []
  for i in range(steps + 1):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    state, metrics = compiled(state, sharding.host_to_global(host, mesh))
    loss = float(jax.device_get(metrics["total"]))
    if i:
      times.append(time.perf_counter() - start)
      cpu.append(_cpu_seconds() - start_cpu)
  return {"times": times, "cpu": cpu, "compile_s": compile_s, "peak_flops": peak, "flops_per_image": flops_per_image,
          "loss": loss, "xla_flags": os.environ.get("XLA_FLAGS", ""), "added_flags": added}


def _run_torch(config, steps: int, channels_last: bool) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_fdnm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  a = torch.from_numpy(np.random.default_rng(1).standard_normal((MATMUL_N, MATMUL_N), np.float32))
  a @ a
  peak = 2.0 * MATMUL_N ** 3 / _best_time(lambda: a @ a, 5)

  model = torch_fdnm.model_from_config(config.model, NUM_CLASSES)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  optimizer = torch_fdnm.make_optimizer(model, config.optim)
  host = _host_batch(config)

  def batch():
    return {k: (torch.from_numpy(v.transpose(0, 3, 1, 2)).contiguous(memory_format=fmt) if v.ndim == 4
                else torch.from_numpy(v).long()) for k, v in host.items()}

  times, cpu = [], []
  start = time.perf_counter()
  torch_fdnm.train_step(model, optimizer, batch(), config.loss)
  first_s = time.perf_counter() - start
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    terms = torch_fdnm.train_step(model, optimizer, batch(), config.loss)
    times.append(time.perf_counter() - start)
    cpu.append(_cpu_seconds() - start_cpu)
  return {"times": times, "cpu": cpu, "compile_s": first_s, "peak_flops": peak, "loss": terms["total"],
          "threads": torch.get_num_threads()}


def _child(args) -> None:
  height, width = (int(v) for v in args.size.split("x"))
  transform = "dft_matmul" if args.side == "jax_dft" else "fft"
  config = benchmark_config(height, width, args.batch, frequency=not args.no_frequency,
                            spectral_transform=transform)
  if args.side in JAX_SIDES:
    out = _run_jax(config, args.steps, cpu_flags=not args.no_cpu_flags)
  else:
    out = _run_torch(config, args.steps, channels_last=args.side == "torch_cl")
  out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(out))


def _spawn(side: str, size: str, batch: int, steps: int, no_frequency: bool = False,
           no_cpu_flags: bool = False) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--size", size, "--batch", str(batch),
         "--steps", str(steps)] + (["--no-frequency"] if no_frequency else []) + (
             ["--no-cpu-flags"] if no_cpu_flags else [])
  load_before = os.getloadavg()[0]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  out["load"] = (load_before, os.getloadavg()[0])
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="288x144,384x144", help="comma-separated HxW image sizes")
  parser.add_argument("--batches", default="16,48", help="comma-separated global batch sizes (multiples of 8)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after one warm-up step)")
  parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
  parser.add_argument("--no-share", action="store_true", help="skip the JAX run without AGP/ANM")
  parser.add_argument("--quick", action="store_true", help="288x144, batch 16, 2 steps")
  parser.add_argument("--no-cpu-flags", action="store_true",
                      help="JAX without fdnm_jax.platform.configure_xla_flags (XLA's default CPU flags)")
  parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--no-frequency", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    _child(args)
    return
  if args.quick:
    args.sizes, args.batches, args.steps = "288x144", "16", 2
  sides = [s for s in args.sides.split(",") if s]
  bad = [s for s in sides if s not in SIDES]
  if bad:
    parser.error(f"--sides: unknown {bad}; expected a subset of {SIDES}")
  print("command:", shlex.join([sys.executable] + sys.argv))
  print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; cpus: {os.cpu_count()}; load average at start: "
        f"{open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else os.getloadavg()}; "
        f"XLA_FLAGS from the environment: {os.environ.get('XLA_FLAGS', '(unset)')!r}")
  rows, notes = [], []
  for size in args.sizes.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      results = {side: _spawn(side, size, batch, args.steps, no_cpu_flags=args.no_cpu_flags) for side in sides}
      shares, flop_share = {}, None
      jax_sides = [s for s in JAX_SIDES if s in sides]
      if jax_sides and not args.no_share:
        results["jax_nofreq"] = _spawn("jax", size, batch, args.steps, no_frequency=True,
                                       no_cpu_flags=args.no_cpu_flags)
        shares = {s: 1.0 - min(results["jax_nofreq"]["times"]) / min(results[s]["times"]) for s in jax_sides}
        flop_share = 1.0 - results["jax_nofreq"]["flops_per_image"] / results[jax_sides[0]]["flops_per_image"]
      peak = max(r["peak_flops"] for r in results.values())
      flops = results[jax_sides[0]]["flops_per_image"] if jax_sides else None
      torch_best = max((batch / min(results[s]["times"]) for s in ("torch", "torch_cl") if s in results),
                       default=None)
      for side, r in results.items():
        ips = batch / min(r["times"])
        mfu = f"{100 * flops * ips / peak:.0f} %" if flops and side != "jax_nofreq" else "-"
        ratio = f"{ips / torch_best:.2f}x" if torch_best and side in JAX_SIDES else "-"
        share_text = f"{100 * shares[side]:.0f} %" if side in shares else "-"
        rows.append(f"| {size} | {batch} | {side} | {ips:.2f} | {batch / np.median(r['times']):.2f} | "
                    f"{min(r['times']):.2f} / {np.median(r['times']):.2f} s | {np.median(r['cpu']):.1f} s | "
                    f"{r['compile_s']:.1f} s | {r['peak_rss_mib']:.0f} MiB | {mfu} | {ratio} | {share_text} | "
                    f"{r['loss']:.3f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
      torch_peaks = [results[s]["peak_flops"] for s in ("torch", "torch_cl") if s in results]
      notes.append(f"{size} batch {batch}: matmul peak JAX {results.get('jax', {}).get('peak_flops', 0) / 1e9:.0f} "
                   f"GFLOP/s, torch {max(torch_peaks or [0]) / 1e9:.0f} GFLOP/s (MFU uses {peak / 1e9:.0f}); model "
                   f"{flops / 1e9 if flops else float('nan'):.1f} GFLOP per training image"
                   + (f" ({100 * flop_share:.1f} % of them in AGP+ANM and the nuance head); " if flop_share else "; ") +
                   f"JAX XLA_FLAGS {results.get('jax', {}).get('xla_flags', '')!r}")
      print(f"done {size} batch {batch}", file=sys.stderr, flush=True)
  print("| size | batch | side | images/s (best step) | images/s (median) | step best / median | CPU s per step "
        "| compile / first step | peak RSS | MFU (best) | JAX / best torch | AGP+ANM share | loss "
        "| load before / after |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print("\n".join(notes))
  print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
  main()
