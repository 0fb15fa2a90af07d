"""Times compute_metrics (jitted, chunked) against AGW's per-query NumPy loop and checks they give the same numbers.

Synthetic retrievals shaped like the real protocols, distances from `pairwise_distance` of random embeddings
(identity centre + noise):
  sysu-single: 3,803 IR queries (cams 3, 6) x 301 gallery items (one per identity per camera for 301 random
               (identity, camera) pairs of 96 identities x cams 1, 2, 4, 5), resampled per trial (seed = trial);
  sysu-multi:  the same with 10 images per pair (3,010 gallery items);
  llcm:        8,000 x 8,000, 351 identities, 9 cameras, random identities and cameras.
Each side runs in its own subprocess so that its peak RSS (ru_maxrss: interpreter, imports, one distance matrix and
the evaluator's own memory) is its own. Imports and JAX start-up are outside the timings; the JAX time includes the
host-to-device copies, and its first trial the compilation.

  python benchmarks/evaluator.py            # full run (several minutes: the NumPy loop is slow)
  python benchmarks/evaluator.py --quick    # 2 trials, a 2,000 x 2,000 llcm
  python benchmarks/evaluator.py --memory-check 16000   # JAX side only: peak RSS on 16,000 x 16,000
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EMBED_DIM = 256
NOISE = 2.5  # per-dimension noise of an image around its identity centre (centres are unit normal).


def _sysu_trial(trial: int, shots: int) -> dict[str, np.ndarray]:
  """Query fixed (seed 1000), gallery pairs resampled with seed = trial."""
  qrng = np.random.default_rng(1000)
  centres = qrng.standard_normal((96, EMBED_DIM))
  q_pids = qrng.integers(0, 96, 3803)
  q_cams = qrng.choice([3, 6], 3803)
  q_emb = centres[q_pids] + NOISE * qrng.standard_normal((3803, EMBED_DIM))
  rng = np.random.default_rng(trial)
  pairs = rng.choice(96 * 4, 301, replace=False)
  g_pids = np.repeat(pairs // 4, shots)
  g_cams = np.repeat(np.array([1, 2, 4, 5])[pairs % 4], shots)
  g_emb = centres[g_pids] + NOISE * rng.standard_normal((len(g_pids), EMBED_DIM))
  return {"q_emb": q_emb, "g_emb": g_emb, "q_pids": q_pids, "g_pids": g_pids, "q_cams": q_cams, "g_cams": g_cams}


def _llcm_trial(trial: int, size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(trial)
  centres = rng.standard_normal((351, EMBED_DIM))
  out = {}
  for side in ("q", "g"):
    pids = rng.integers(0, 351, size)
    out.update({f"{side}_pids": pids, f"{side}_cams": rng.integers(1, 10, size),
                f"{side}_emb": centres[pids] + NOISE * rng.standard_normal((size, EMBED_DIM))})
  return out


def _settings(quick: bool) -> list[dict[str, Any]]:
  trials = 2 if quick else 10
  llcm_size = 2000 if quick else 8000
  return [
      {"name": "sysu-single", "protocol": "sysu", "trials": trials, "numpy_trials": trials,
       "make": lambda t: _sysu_trial(t, 1)},
      {"name": "sysu-multi", "protocol": "sysu", "trials": trials, "numpy_trials": trials,
       "make": lambda t: _sysu_trial(t, 10)},
      {"name": "llcm", "protocol": "llcm", "trials": 2 if quick else 3, "numpy_trials": 1,
       "make": lambda t: _llcm_trial(t, llcm_size)},
  ]


def _write_data(setting: dict[str, Any], directory: str) -> None:
  """Distances (float32, from pairwise_distance) and labels of every trial, as .npz files."""
  from fdnm_jax.evaluation import pairwise_distance  # pylint: disable=g-import-not-at-top
  for t in range(setting["trials"]):
    d = setting["make"](t)
    dist = np.asarray(pairwise_distance(d["q_emb"].astype(np.float32), d["g_emb"].astype(np.float32)))
    np.savez(os.path.join(directory, f"{setting['name']}_{t}.npz"), dist=dist,
             **{k: d[k] for k in ("q_pids", "g_pids", "q_cams", "g_cams")})


def _evaluator(side: str, protocol: str) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, float, float]]:
  """fn(trial data) -> (cmc, mAP, mINP) of one side; imports (and starts JAX) outside the timed calls."""
  if side == "jax":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from fdnm_jax.evaluation import compute_metrics  # pylint: disable=g-import-not-at-top
    jnp.zeros(1).block_until_ready()

    def run(d):
      m = compute_metrics(d["dist"], d["q_pids"], d["g_pids"], d["q_cams"], d["g_cams"], protocol)
      return m["cmc"], m["mAP"], m["mINP"]
    return run
  from benchmarks import reference_eval  # pylint: disable=g-import-not-at-top
  reference = getattr(reference_eval, f"eval_{protocol}")
  return lambda d: reference(d["dist"], d["q_pids"], d["g_pids"], d["q_cams"], d["g_cams"])


def _run_side(side: str, name: str, protocol: str, trials: int, directory: str) -> None:
  """Subprocess body: evaluates each trial's file, prints JSON with times, metrics and peak RSS."""
  evaluate = _evaluator(side, protocol)
  times, results = [], []
  for t in range(trials):
    with np.load(os.path.join(directory, f"{name}_{t}.npz")) as f:
      data = {k: f[k] for k in f.files}
    start = time.perf_counter()
    cmc, mean_ap, mean_inp = evaluate(data)
    times.append(time.perf_counter() - start)
    results.append({"cmc": np.asarray(cmc, np.float64).tolist(), "mAP": float(mean_ap), "mINP": float(mean_inp)})
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"times": times, "results": results, "peak_rss_mib": peak_mib}))


def _side(side: str, setting: dict[str, Any], trials: int, directory: str) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--name", setting["name"], "--protocol",
         setting["protocol"], "--trials", str(trials), "--data", directory]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _max_abs_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
  diffs = [max(np.max(np.abs(np.subtract(x["cmc"], y["cmc"]))), abs(x["mAP"] - y["mAP"]), abs(x["mINP"] - y["mINP"]))
           for x, y in zip(a, b)]
  return float(max(diffs))


def _report(setting: dict[str, Any], jax_out: dict[str, Any], np_out: dict[str, Any]) -> str:
  jt, nt = np.array(jax_out["times"]), np.array(np_out["times"])
  n = len(nt)
  jax_same = jt[:n].sum()
  warm = jt[1:].mean() if len(jt) > 1 else jt[0]
  first = jax_out["results"][0]
  return (f"| {setting['name']} | {setting['trials']} / {n} | {jt.sum():.2f} s ({jt[0]:.2f} s first, "
          f"{warm:.3f} s warm) | {nt.sum():.2f} s ({nt.mean():.2f} s/trial) | "
          f"{nt.sum() / jax_same:.0f}x ({nt.mean() / warm:.0f}x warm) | "
          f"{_max_abs_diff(jax_out['results'], np_out['results']):.1e} | {jax_out['peak_rss_mib']:.0f} / "
          f"{np_out['peak_rss_mib']:.0f} MiB | R1 {100 * first['cmc'][0]:.1f}, mAP {100 * first['mAP']:.1f} |")


def _memory_check(size: int) -> None:
  """JAX side only: peak RSS growth of compute_metrics on a random size x size llcm retrieval."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdnm_jax.evaluation import compute_metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dist = rng.random((size, size), dtype=np.float32)
  labels = [rng.integers(0, 351, size), rng.integers(0, 351, size), rng.integers(1, 10, size),
            rng.integers(1, 10, size)]
  jnp.zeros(1).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  compute_metrics(dist, *labels, protocol="llcm")
  elapsed = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"llcm {size} x {size}: distmat {dist.nbytes / 2**20:.0f} MiB; peak RSS {before:.0f} MiB before the call, "
        f"{after:.0f} MiB after (+{after - before:.0f} MiB); {elapsed:.1f} s including compilation")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="2 trials and a 2,000 x 2,000 llcm")
  parser.add_argument("--memory-check", type=int, metavar="N",
                      help="only measure the JAX evaluator's peak RSS on a random N x N llcm retrieval")
  parser.add_argument("--side", choices=("jax", "numpy"), help=argparse.SUPPRESS)
  parser.add_argument("--name", help=argparse.SUPPRESS)
  parser.add_argument("--protocol", help=argparse.SUPPRESS)
  parser.add_argument("--trials", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    _run_side(args.side, args.name, args.protocol, args.trials, args.data)
    return
  if args.memory_check:
    _memory_check(args.memory_check)
    return
  print("command:", shlex.join([sys.executable] + sys.argv))
  print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; cpus: {os.cpu_count()}; load average at start: "
        f"{os.getloadavg()[0]:.2f}")
  print("| setting | trials JAX / NumPy | JAX total | NumPy loop total | speed-up on the NumPy trials | max abs diff "
        "| peak RSS JAX / NumPy | trial 0 (%) |")
  print("|---|---|---|---|---|---|---|---|")
  for setting in _settings(args.quick):
    with tempfile.TemporaryDirectory() as directory:
      _write_data(setting, directory)
      jax_out = _side("jax", setting, setting["trials"], directory)
      np_out = _side("numpy", setting, setting["numpy_trials"], directory)
    print(_report(setting, jax_out, np_out), flush=True)
  print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
