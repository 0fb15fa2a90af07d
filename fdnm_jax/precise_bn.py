"""Precise BN: re-estimate every BatchNorm's running statistics, in network order, before scoring.

Why: a BatchNorm's running averages are an exponential average of *training-mode* batch statistics, taken while the
weights moved and while every BatchNorm upstream normalised with its own batch statistics. In eval mode the upstream
BatchNorms use their running averages instead, so a BatchNorm's input can have another distribution than the one its
running statistics describe. FDNM's reference reading makes this gap large (ANM's BN is called once per branch with
per-branch batch statistics in training but applies one shared running average at test; the BNNeck's running
variance then sits at its epsilon), and the test embeddings collapse (health.py). The anchor is fast-reid's PreciseBN
hook, which averages the batch statistics of N batches with the model in training mode; this module goes one step
further and recalibrates *sequentially*: every BatchNorm's statistics are those of its input when every BatchNorm
before it already uses its recalibrated statistics, i.e. exactly the statistics of what eval mode feeds it.

How (`recalibrate`, a pure function of (model, variables, batches)):
1. `dependency_levels`: trace the model once (`jax.make_jaxpr`) with a method interceptor that records the input of
   every BatchNorm call, and follow the data flow of the jaxpr from each BatchNorm's running statistics to every
   BatchNorm input. A BatchNorm's level is 1 + the highest level of the BatchNorms its input depends on (1 for none).
   BatchNorms of one level do not depend on each other (the two stems; a bottleneck's bn1 and its downsample BN).
2. One pass per level over the N batches, in eval mode with the current variables: the pass computes, per batch and
   per BatchNorm call, the mean and the (biased, centred) variance of its input over all axes but the feature axis,
   in float32; the host pools them over batches and calls (float64: mean of means; mean of variances plus the
   variance of the means, weighted by element counts) and writes mean and var of that level's BatchNorms.
   The statistics are population statistics of the N batches (biased variance, as Flax's running average uses
   the biased batch variance); fast-reid averages per-batch variances instead, which omits the variance of the
   batch means.
   One compiled function serves every pass (the variables are an argument), so the cost is one compile plus
   levels x N forward passes: ResNet-50 FDNM has 51 levels (stems 1, 16 bottlenecks x 3, ANM 1, BNNeck 1), the
   (1, 1, 1, 1) demo network 15. A cheaper exact scheme (one forward's worth of compute: hold all N batches'
   activations at the current depth and advance layer by layer) needs the model split into segments; not done.
3. BatchNorms the batches never reach keep their statistics (listed in the info).

A BatchNorm called several times per forward pass (ANM's `bn` in the reference reading, once per branch) has one
set of running statistics, but training normalised each call with that call's own batch statistics.
`config.evals.recalibrate_bn_per_call` (default True) picks what eval mode applies to it:
- True: one set of statistics per call (collection `per_call_stats`, [calls, C], row j for the j-th call), applied
  by `PerCallModel` (a Flax method interceptor that normalises the j-th call with row j through Flax's own
  BatchNorm arithmetic). This is what training optimised. Its batch_stats get the pooled statistics either way.
- False: the statistics of all its calls pooled, the one set the module's running average can hold.
Measured on the README demo (configs/synthetic.py, seed 0, the reference reading, N = 50, flip on): pooled leaves
the test embeddings collapsed (mean cosine to the mean embedding 0.967, mAP 43.3 / 36.8 from 55.9 / 53.9 with the
checkpoint's statistics); per call brings it to 0.21 with mAP 59.8 / 56.9. The two branches' map means differ
(half their difference: median 0.28 of the pooled standard deviation per channel); pooled statistics leave each
branch that offset, which global pooling keeps while it averages away most per-image variation, so it becomes a
direction common to all images (the likely mechanism, not separately measured).

The batches (`training_batches`): the cross-modality sampler's batches 0..N-1 of the run's seed (P identities x K
visible + K infrared images, `CrossModalitySampler`), with the *eval* transform (resize to the input size and
normalise; no pad/crop, flip, grayscale, erasing or channel augmentation), so the statistics describe the images
the evaluator embeds.

Persistence (`for_evaluation`): the recalibrated statistics go to `<workdir>/recalibrated_bn/<step>/
batches<N>_<per_call|pooled>/` (`stats.npz`, one array per "<collection>/<path>/<mean|var>", and `meta.json`),
beside the checkpoint, never into `<workdir>/checkpoints/` (orbax owns that folder). A later evaluation of the same
step with the same fingerprint (N, per_call, seed, sampler, input size, data set) loads them instead of recomputing;
anything else recomputes and replaces that folder.
"""

import io
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax
import flax.linen as nn
from flax.linen import normalization as flax_normalization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.extend import core as jex_core

from fdnm_jax import checkpoints, sharding
from fdnm_jax.errors import ConfigError
from fdnm_jax.progress import Progress
from input_pipeline import pipeline, sources
from input_pipeline.sampling import CrossModalitySampler

FOLDER = "recalibrated_bn"  # <workdir>/FOLDER/<step>/batches<N>/
STATS_FILE = "stats.npz"
TRANSFORM = "eval (resize + normalise)"  # the batches' transform, as the evaluator's.
META_FILE = "meta.json"


def _module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


PER_CALL = "per_call_stats"  # variables collection: per-call statistics of BatchNorms called several times.


class _Recorder:
  """A Flax method interceptor over every BatchNorm call: records (path, feature axis, input) and, in eval mode,
  normalises with the call's own statistics where the variables hold them (collection PER_CALL, [calls, C]: row j
  for the j-th call of that module in the forward pass), else lets Flax's BatchNorm run."""

  def __init__(self):
    self.calls: list[tuple[str, int, jax.Array]] = []
    self.count: dict[str, int] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    path = _module_path(module)
    self.calls.append((path, module.axis % x.ndim, x))
    index = self.count.get(path, 0)
    self.count[path] = index + 1
    use_running_average = nn.merge_param("use_running_average", module.use_running_average,
                                         args[1] if len(args) > 1 else kwargs.get("use_running_average"))
    if not use_running_average or not module.has_variable(PER_CALL, "mean") or kwargs.get("mask") is not None:
      return next_fun(*args, **kwargs)
    # Flax's own eval-mode normalisation (flax.linen.normalization.BatchNorm.__call__), with this call's row.
    feature_axes = (module.axis % x.ndim,)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    mean = module.get_variable(PER_CALL, "mean")[index]
    var = module.get_variable(PER_CALL, "var")[index]
    return flax_normalization._normalize(  # pylint: disable=protected-access
        module, x, mean, var, reduction_axes, feature_axes, module.dtype, module.param_dtype, module.epsilon,
        module.use_bias, module.use_scale, module.bias_init, module.scale_init, module.force_float32_reductions)


def bn_inputs(model: nn.Module, variables: Any, visible: jax.Array, infrared: jax.Array) -> list[tuple[str, int,
                                                                                                        jax.Array]]:
  """The input of every BatchNorm call of an eval-mode forward pass, in call order: [(path, feature axis, x)].

  `path` is the module path joined by "/" (e.g. "layer1/block0/bn1", "anm/bn", "bnneck"), the key of its
  running statistics in variables["batch_stats"]. Per-call statistics in `variables` (PER_CALL) are applied.
  Works inside and outside jit.
  """
  recorder = _Recorder()
  with nn.intercept_methods(recorder):
    model.apply(variables, visible, infrared, train=False)
  return recorder.calls


class PerCallModel:
  """A Flax model whose `apply` normalises each call of a BatchNorm with that call's own statistics where the
  variables hold them (collection PER_CALL, written by `recalibrate(per_call=True)`); otherwise the model itself.

  Only `apply` (and attribute reads) are provided: what the evaluator and extraction call.
  """

  def __init__(self, model: nn.Module):
    self.model = model

  def apply(self, variables: Any, *args, **kwargs):
    if PER_CALL not in variables:
      return self.model.apply(variables, *args, **kwargs)
    with nn.intercept_methods(_Recorder()):
      return self.model.apply(variables, *args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)


def _moments(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Mean and biased centred variance of x over every axis but `axis`, float32 [C] each."""
  x = x.astype(jnp.float32)
  axes = tuple(i for i in range(x.ndim) if i != axis)
  mean = jnp.mean(x, axis=axes)
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=axes)
  return mean, var


def _flat_stats(batch_stats: Mapping[str, Any]) -> dict[str, Any]:
  """{"path/mean": leaf, "path/var": leaf} of a nested batch_stats tree."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(batch_stats)).items()}


def _sub_jaxpr(eqn: Any) -> Optional[Any]:
  """The inner jaxpr of a call-like equation (pjit, custom_jvp/vjp calls) whose inputs/outputs match the
  equation's one to one; None for any other equation."""
  for value in eqn.params.values():
    inner = value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
    if (isinstance(inner, jex_core.Jaxpr) and len(inner.invars) == len(eqn.invars)
        and len(inner.outvars) == len(eqn.outvars)):
      return inner
  return None


def _dependency_masks(jaxpr: Any, in_masks: Sequence[int]) -> list[int]:
  """For each output of `jaxpr`, the OR of the bit masks of the inputs it depends on (through the data flow).

  Call-like equations are followed inside; any other equation with sub-computations (loops, conditionals) makes
  each output depend on all its inputs (conservative: it can only add levels, never miss a dependency).
  """
  env: dict[Any, int] = {v: 0 for v in jaxpr.constvars}
  env.update(zip(jaxpr.invars, in_masks))

  def read(atom):
    return 0 if isinstance(atom, jex_core.Literal) else env.get(atom, 0)

  for eqn in jaxpr.eqns:
    masks = [read(a) for a in eqn.invars]
    inner = _sub_jaxpr(eqn)
    if inner is not None:
      outs = _dependency_masks(inner, masks)
    else:
      union = 0
      for m in masks:
        union |= m
      outs = [union] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def dependency_levels(model: nn.Module, variables: Any, visible: Any, infrared: Any) -> tuple[list[list[str]],
                                                                                                list[str]]:
  """The BatchNorms grouped by level (see the module docstring), from one trace of the model.

  Args:
    model, variables: the Flax model and its variables ("params", "batch_stats").
    visible, infrared: example inputs [b, H, W, 3] (arrays or ShapeDtypeStructs; only shapes are used).
  Returns:
    (levels, uncalled): levels[i] = the BatchNorm paths of level i + 1 in first-call order; `uncalled` = the
    BatchNorms of variables["batch_stats"] the forward pass never calls.
  Raises:
    ValueError: a BatchNorm's input depends on its own statistics (a BatchNorm applied in series with itself:
      sequential recalibration is not defined).
  """
  stats = _flat_stats(variables["batch_stats"])
  bn_paths = sorted({k.rsplit("/", 1)[0] for k in stats})
  bit = {p: 1 << i for i, p in enumerate(bn_paths)}
  others = {k: v for k, v in variables.items() if k != "batch_stats"}
  calls: list[tuple[str, int, Any]] = []

  def inputs_of(batch_stats, others, visible, infrared):
    calls.clear()
    recorded = bn_inputs(model, {**others, "batch_stats": batch_stats}, visible, infrared)
    calls.extend(recorded)
    return [x for _, _, x in recorded]

  shaped = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  closed = jax.make_jaxpr(inputs_of)(jax.tree.map(shaped, variables["batch_stats"]), jax.tree.map(shaped, others),
                                     shaped(visible), shaped(infrared))
  leaf_paths = ["/".join(str(getattr(k, "key", k)) for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]]
  num_other = len(jax.tree.leaves(others)) + 2
  in_masks = [bit[p.rsplit("/", 1)[0]] for p in leaf_paths] + [0] * num_other
  out_masks = _dependency_masks(closed.jaxpr, in_masks)

  depends: dict[str, int] = {}
  order: list[str] = []
  for (path, _, _), mask in zip(calls, out_masks):
    if path not in depends:
      order.append(path)
      depends[path] = 0
    depends[path] |= mask
  level: dict[str, int] = {}
  for path in order:  # a BatchNorm's dependencies are called before it, so their levels are known.
    if depends[path] & bit[path]:
      raise ValueError(f"BatchNorm {path!r}: its input depends on its own running statistics (applied in series "
                       "with itself); sequential recalibration is not defined for it.")
    deps = [p for p in order if depends[path] & bit[p]]
    missing = [p for p in deps if p not in level]
    if missing:
      raise ValueError(f"BatchNorm {path!r} depends on {missing}, which are called after it.")
    level[path] = 1 + max((level[p] for p in deps), default=0)
  levels = [[p for p in order if level[p] == i] for i in range(1, max(level.values(), default=0) + 1)]
  return levels, [p for p in bn_paths if p not in level]


def _pool(parts: Iterable[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """Pooled mean and biased variance of groups given as (element count, mean, biased variance), float64."""
  parts = [(float(n), np.asarray(m, np.float64), np.asarray(v, np.float64)) for n, m, v in parts]
  total = sum(n for n, _, _ in parts)
  mean = sum(n * m for n, m, _ in parts) / total
  var = sum(n * (v + np.square(m - mean)) for n, m, v in parts) / total
  return mean, var


def _replicated_like(x: Any) -> Optional[jax.sharding.Sharding]:
  s = getattr(x, "sharding", None)
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return None


def _committed(x: Any) -> jax.Array:
  """`x` as a jax.Array committed to its placement (a NumPy or uncommitted leaf goes to the default device): every
  leaf of the variables the passes see is committed, so one compiled program serves every pass."""
  if isinstance(x, jax.Array):
    return jax.device_put(x, x.sharding)
  return jax.device_put(np.asarray(x), jax.devices()[0])


def _place_like(value: np.ndarray, like: Any) -> jax.Array:
  """`value` on the devices of the array `like` (replicated over its mesh when `like` is mesh-sharded: the value
  may have another shape), committed."""
  s = getattr(like, "sharding", None)
  if isinstance(s, jax.sharding.NamedSharding):
    s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return jax.device_put(value, s if s is not None else jax.devices()[0])


def _set_leaves(tree: Any, new_leaves: Mapping[str, np.ndarray]) -> dict:
  """A nested dict `tree` with the leaves named in `new_leaves` ("a/b/leaf") replaced, with the dtype, shape and
  placement of the leaf they replace."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
  for key, value in new_leaves.items():
    old = flat[key]
    flat[key] = _place_like(np.asarray(value, dtype=old.dtype).reshape(old.shape), old)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _with_per_call_slots(variables: Any, num_calls: Mapping[str, int]) -> dict:
  """`variables` with a PER_CALL collection holding, for every BatchNorm called k > 1 times, mean and var
  [k, C] filled with its running statistics (so the forward pass is unchanged until they are recalibrated)."""
  stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]), sep="/")
  flat = {}
  for path, k in num_calls.items():
    for name in ("mean", "var"):
      leaf = stats[f"{path}/{name}"]
      value = np.broadcast_to(np.asarray(jax.device_get(leaf))[None], (k,) + tuple(np.shape(leaf)))
      flat[f"{path}/{name}"] = _place_like(np.ascontiguousarray(value), leaf)
  return {**variables, PER_CALL: flax.traverse_util.unflatten_dict(flat, sep="/")}


def recalibrate(model: nn.Module, variables: Any, batches: Sequence[Mapping[str, Any]], per_call: bool = False,
                progress: Optional[Progress] = None) -> tuple[dict, dict]:
  """Sequential precise BN (see the module docstring): returns (variables, info); `variables` is not modified.

  Args:
    model: the Flax model (called as model.apply(variables, visible, infrared, train=False)).
    variables: {"params", "batch_stats", ...}.
    batches: re-iterable (a list) of {"visible": [b, H, W, 3], "infrared": [b, H, W, 3]} (NumPy or global
      jax.Arrays); every pass reads all of them.
    per_call: a BatchNorm called several times per forward pass gets one set of statistics per call (collection
      PER_CALL, applied by `PerCallModel`), as training normalised each call with its own batch statistics; its
      batch_stats get the statistics pooled over the calls either way (what `per_call=False` uses).
    progress: counts forward passes (batches x levels) when given (the caller calls `done()`).
  Returns:
    (the variables with recalibrated batch_stats (and PER_CALL), info {"batches", "levels", "forward_passes",
    "bn_modules", "per_call" (the paths with per-call statistics), "uncalled" (paths left as they were)}).
  Raises:
    ValueError: no batches.
  """
  batches = list(batches)
  if not batches:
    raise ValueError("precise BN needs at least one batch")
  first = batches[0]
  levels, uncalled = dependency_levels(model, variables, first["visible"], first["infrared"])
  call_info = _call_counts(model, variables, first)
  num_calls: dict[str, int] = {}
  for path, _ in call_info:
    num_calls[path] = num_calls.get(path, 0) + 1
  multi = {p: k for p, k in num_calls.items() if k > 1} if per_call else {}

  def moments(variables, visible, infrared):
    return [_moments(x, axis) for _, axis, x in bn_inputs(model, variables, visible, infrared)]

  out_sharding = _replicated_like(first["visible"])
  moments_fn = jax.jit(moments, out_shardings=out_sharding) if out_sharding is not None else jax.jit(moments)
  # Plain nested dicts, and the PER_CALL slots from the start: the same pytree structure (one compile) in every pass.
  current = jax.tree.map(_committed, {**variables, "batch_stats": _set_leaves(variables["batch_stats"], {})})
  if multi:
    current = _with_per_call_slots(current, multi)
  for level in levels:
    members = set(level)
    parts: dict[str, list] = {p: [] for p in level}
    seen: dict[str, int] = {}
    wanted = []
    for i, (path, count) in enumerate(call_info):
      seen[path] = seen.get(path, 0) + 1
      if path in members:
        wanted.append((i, path, seen[path] - 1, count))
    for batch in batches:
      out = moments_fn(current, batch["visible"], batch["infrared"])
      fetched = jax.device_get([out[i] for i, _, _, _ in wanted])
      for (_, path, call, count), (mean, var) in zip(wanted, fetched):
        parts[path].append((call, count, mean, var))
      if progress is not None:
        progress.update(1)
    pooled, split = {}, {}
    for path in level:
      mean, var = _pool((n, m, v) for _, n, m, v in parts[path])
      pooled[f"{path}/mean"], pooled[f"{path}/var"] = mean, var
      if path in multi:
        rows = [_pool((n, m, v) for c, n, m, v in parts[path] if c == j) for j in range(multi[path])]
        split[f"{path}/mean"] = np.stack([m for m, _ in rows])
        split[f"{path}/var"] = np.stack([v for _, v in rows])
    current = {**current, "batch_stats": _set_leaves(current["batch_stats"], pooled)}
    if split:
      current = {**current, PER_CALL: _set_leaves(current[PER_CALL], split)}
  info = {"batches": len(batches), "levels": len(levels), "forward_passes": len(levels) * len(batches),
          "bn_modules": sum(len(level) for level in levels), "per_call": sorted(multi), "uncalled": uncalled}
  return current, info


def _call_counts(model: nn.Module, variables: Any, batch: Mapping[str, Any]) -> list[tuple[str, int]]:
  """(path, elements reduced per channel) of every BatchNorm call, in call order (shapes only)."""
  calls: list[tuple[str, int]] = []

  def trace(variables, visible, infrared):
    for path, axis, x in bn_inputs(model, variables, visible, infrared):
      calls.append((path, int(np.prod([d for i, d in enumerate(x.shape) if i != axis]))))
    return 0

  jax.eval_shape(trace, variables, batch["visible"], batch["infrared"])
  return calls


def training_batches(source: sources.DataSource, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     num_batches: int) -> list[dict[str, jax.Array]]:
  """The sampler's batches 0..num_batches-1 (seed config.seed) with the eval transform, as global arrays.

  Returns:
    [{"visible": float32 [P*K, H, W, 3], "infrared": float32 [P*K, H, W, 3]}] sharded over the mesh's batch axes;
    each process reads its contiguous slice of every batch (`pipeline.eval_batches`).
  """
  c = config.input
  sampler = CrossModalitySampler(source.train_visible.labels, source.train_infrared.labels, c.num_ids_per_batch,
                                 c.num_instances, config.seed)
  indices = [sampler.batch_indices(step) for step in range(num_batches)]
  per_batch = sampler.batch_size
  shards = sharding.num_batch_shards(mesh)
  if per_batch % shards:
    raise ConfigError(f"precise BN: P*K = {per_batch} images per modality do not split over the {shards} batch "
                      "shards of the mesh: change config.input.num_ids_per_batch/num_instances or config.mesh.")
  streams = []
  for image_set, which in ((source.train_visible, 0), (source.train_infrared, 1)):
    subset = image_set.subset(np.concatenate([idx[which] for idx in indices]))
    streams.append(pipeline.eval_batches(subset, c, per_batch, process_index=jax.process_index(),
                                         process_count=jax.process_count()))
  return [sharding.host_to_global({"visible": v["images"], "infrared": i["images"]}, mesh)
          for v, i in zip(*streams)]


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What determines a recalibration besides the checkpoint: a saved one is reused only when its fingerprint
  equals the current one."""
  c = config.input
  num_batches = int(config.evals.recalibrate_bn_batches)
  return {"batches": num_batches, "per_call": bool(config.evals.recalibrate_bn_per_call), "seed": int(config.seed),
          "num_ids_per_batch": int(c.num_ids_per_batch), "num_instances": int(c.num_instances),
          "height": int(c.height), "width": int(c.width), "dataset": str(config.dataset),
          "data_root": str(config.data.root), "data_dir": str(config.data.data_dir), "trial": int(config.data.trial),
          "fold": int(config.data.fold), "num_val_ids": int(config.data.get("num_val_ids", 0)),
          "transform": TRANSFORM, "sampler_steps": [0, num_batches]}


def saved_folder(workdir: str, step: int, num_batches: int, per_call: bool) -> str:
  """`<workdir>/recalibrated_bn/<step>/batches<N>_<per_call|pooled>` (a local path or a gs:// URL)."""
  name = f"batches{int(num_batches)}_{'per_call' if per_call else 'pooled'}"
  return str(epath.Path(checkpoints.absolute(workdir)) / FOLDER / str(int(step)) / name)


def _collections(variables: Any) -> dict[str, Any]:
  """{"batch_stats/<path>/<leaf>": array, "per_call_stats/...": array} of the recalibrated collections."""
  out = {}
  for collection in ("batch_stats", PER_CALL):
    if collection in variables:
      out.update({f"{collection}/{k}": v for k, v in _flat_stats(variables[collection]).items()})
  return out


def save(folder: str, variables: Any, meta: Mapping[str, Any]) -> None:
  """Writes the recalibrated statistics (`stats.npz`: batch_stats and PER_CALL, one array per
  "<collection>/<path>/<leaf>") and `meta.json` into `folder`; meta last: a folder without it is not loaded."""
  path = epath.Path(folder)
  path.mkdir(parents=True, exist_ok=True)
  (path / META_FILE).unlink(missing_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(jax.device_get(v)) for k, v in _collections(variables).items()})
  tmp = path / (STATS_FILE + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.rename(path / STATS_FILE)
  (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load(folder: str, variables: Any, meta: Mapping[str, Any]) -> Optional[dict]:
  """The variables with the statistics saved in `folder`, or None when there are none, their meta differs from
  `meta` (fingerprint and step), or their batch_stats tree does not match `variables`."""
  path = epath.Path(folder)
  if not (path / META_FILE).exists() or not (path / STATS_FILE).exists():
    return None
  saved_meta = json.loads((path / META_FILE).read_text())
  if any(saved_meta.get(k) != v for k, v in meta.items()):
    return None
  with np.load(io.BytesIO((path / STATS_FILE).read_bytes())) as data:
    saved = {k: data[k] for k in data.files}
  stats = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("batch_stats/")}
  per_call = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(PER_CALL + "/")}
  current = _flat_stats(variables["batch_stats"])
  if set(stats) != set(current) or any(stats[k].shape != np.shape(current[k]) for k in stats):
    return None
  out = {**variables, "batch_stats": _set_leaves(variables["batch_stats"], stats)}
  if per_call:
    placed = {}
    for key, value in per_call.items():
      placed[key] = _place_like(value, current[key])
    out[PER_CALL] = flax.traverse_util.unflatten_dict(placed, sep="/")
  return out


def for_evaluation(model: nn.Module, variables: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   workdir: Optional[str], step: Optional[int],
                   source: Optional[sources.DataSource] = None) -> tuple[Any, Any, Optional[dict]]:
  """The model and variables to score with: recalibrated when config.evals.recalibrate_bn_batches = N > 0.

  Loads `saved_folder(workdir, step, N, per_call)` when it holds a matching recalibration; otherwise computes it
  on N training batches (`training_batches` of `source`, read from the config when None) and saves it there
  (process 0; nothing is saved when `workdir` or `step` is None). The checkpoint itself is never written.

  Returns:
    (model, variables, info): unchanged and info None when off; else the model wrapped in `PerCallModel` when
    per-call statistics were made, and info {"batches", "images", "seed", "sampler_steps", "transform", "per_call",
    "per_call_modules", "levels", "forward_passes", "path" (folder or None), "reused" (loaded from `path`),
    "uncalled"}.
  """
  num_batches = int(config.evals.recalibrate_bn_batches)
  if num_batches < 0:
    raise ConfigError(f"evals.recalibrate_bn_batches={num_batches}: expected 0 (off) or a number of batches.")
  if num_batches == 0:
    return model, variables, None
  per_call = bool(config.evals.recalibrate_bn_per_call)
  meta = {"step": None if step is None else int(step), **fingerprint(config)}
  folder = saved_folder(workdir, step, num_batches, per_call) if workdir is not None and step is not None else None
  images = 2 * num_batches * config.input.num_ids_per_batch * config.input.num_instances
  info = {"batches": num_batches, "images": images, "seed": int(config.seed), "sampler_steps": [0, num_batches],
          "transform": TRANSFORM, "per_call": per_call, "path": folder}
  loaded = load(folder, variables, meta) if folder is not None else None
  if loaded is not None:
    saved_meta = json.loads((epath.Path(folder) / META_FILE).read_text())
    info.update({k: saved_meta.get(k) for k in ("levels", "forward_passes", "per_call_modules", "uncalled")},
                reused=True)
    logging.info("Precise BN: loaded the BatchNorm statistics recalibrated on %d training batches from %s",
                 num_batches, folder)
    return (PerCallModel(model) if PER_CALL in loaded else model), loaded, info
  if source is None:
    source = sources.load_source(config, workdir)
  batches = training_batches(source, config, mesh, num_batches)
  progress = Progress("precise BN", total=None, unit="forward pass")
  new_variables, stats = recalibrate(model, variables, batches, per_call=per_call, progress=progress)
  progress.done()
  info.update(levels=stats["levels"], forward_passes=stats["forward_passes"], per_call_modules=stats["per_call"],
              uncalled=stats["uncalled"], reused=False)
  if folder is not None and jax.process_index() == 0:
    save(folder, new_variables, {**meta, **{k: info[k] for k in ("levels", "forward_passes", "per_call_modules",
                                                                  "uncalled")}})
  logging.info("Precise BN: recalibrated %d BatchNorms in %d levels (%d forward passes) on %d training batches "
               "(%d images, eval transform; per-call statistics for %s)%s", stats["bn_modules"], stats["levels"],
               stats["forward_passes"], num_batches, images, stats["per_call"] or "none",
               f"; saved to {folder}" if folder else "")
  return (PerCallModel(model) if PER_CALL in new_variables else model), new_variables, info
