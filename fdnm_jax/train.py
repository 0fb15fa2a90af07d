"""The train state, the sharded train step and the train-and-evaluate loop.

Multi-host: every host runs this same program on its own slice of each global batch; only process 0
writes config.json, metrics.jsonl and results/ (every host writes its shards of the checkpoints into
the shared `<workdir>/checkpoints`). Preemption: SIGTERM (one process) or JAX's preemption sync point
(multi-host, after `jax.distributed.initialize`) saves a checkpoint at the current step and raises
`Preempted`; `main.py` then exits 0 and the next start resumes from that checkpoint.
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from etils import epath

from fdnm_jax import checkpoints, distributed, losses, optim, precise_bn, pretrained, run_config, sharding
from fdnm_jax.errors import NonFiniteLossError, WorkdirError
from fdnm_jax.evaluation import evaluator
from fdnm_jax.models.fdnm import fdnm_from_config
from input_pipeline import pipeline, sources
from input_pipeline.sampling import CrossModalitySampler


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. All leaves are arrays (checkpointable)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class Preempted(Exception):
  """Training stopped on a preemption notice after saving a checkpoint; `step` and `checkpoint` say where."""

  def __init__(self, step: int, checkpoint: str):
    super().__init__(f"Preempted: saved the checkpoint at step {step} to {checkpoint}; the next start resumes "
                     "from it.")
    self.step = step
    self.checkpoint = checkpoint


class PreemptionWatch:
  """Tells the train loop, after each step, whether to save and stop.

  One process: a SIGTERM handler that only sets a flag (no work in the handler), installed while the watch is
  open (main thread only). Multi-host (`jax.distributed` initialised): JAX's preemption sync manager catches
  SIGTERM on any host and agrees on a step all hosts stop at; `reached(step)` asks it (orbax's
  `reached_preemption`), so every host saves the same step. Call `reached` on every host after every step.
  """

  def __init__(self):
    self.flag = threading.Event()
    self.synced = distributed.is_initialized()
    self._previous = None
    if not self.synced and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.flag.set())

  def reached(self, step: int, manager: Any) -> bool:
    """Whether to stop after `step` (1-based count of completed steps)."""
    if self.synced:
      return bool(manager.reached_preemption(step))
    return self.flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _steps_per_epoch(config: ml_collections.ConfigDict, source: sources.DataSource) -> int:
  if config.schedule.steps_per_epoch > 0:
    return config.schedule.steps_per_epoch
  sampler = CrossModalitySampler(source.train_visible.labels, source.train_infrared.labels,
                                 config.input.num_ids_per_batch, config.input.num_instances, config.seed)
  return sampler.steps_per_epoch


def create_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, int, int, int], weights: Optional[tuple] = None) -> TrainState:
  """Initialises params, BN statistics and optimizer state. `input_shape` = (b, H, W, 3) per modality.

  `weights`: converted pretrained (params, batch_stats) (`pretrained.load_converted`) merged into the fresh
  variables before the optimizer state is made; None = random init.
  """
  dummy = jnp.zeros(input_shape, jnp.float32)
  variables = model.init(rng, dummy, dummy, train=False)
  if weights is not None:
    variables = pretrained.merge(variables, *weights)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def make_train_step(model: Any, tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict):
  """fn(state, batch) -> (state, metrics): one SGD step on a cross-modality batch.

  batch: "visible", "infrared" float32 [b, H, W, 3]; "visible_labels", "infrared_labels" int32 [b].
  metrics: loss terms (float32 scalars) by name ("total", "id", "triplet", ...) and "grad_norm".
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    labels = jnp.concatenate([batch["visible_labels"], batch["infrared_labels"]])
    modality = jnp.concatenate([jnp.zeros_like(batch["visible_labels"]), jnp.ones_like(batch["infrared_labels"])])

    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                     batch["visible"], batch["infrared"], train=True, mutable=["batch_stats"])
      total, terms = losses.total_loss(outputs, labels, modality, loss_config)
      return total, (terms, updates["batch_stats"])

    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {k: v.astype(jnp.float32) for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
    return new_state, metrics

  return train_step


# The logged terms in the order a train step computes them (losses.total_loss: the ID loss, the triplet, L_cnm, the
# orthogonality term, their weighted total; then the gradient): when several are non-finite, the first in this order
# is where it went bad. Terms not listed here come after them, by name.
TERMS_IN_COMPUTE_ORDER = ("id", "triplet", "cnm", "ortho", "total", "grad_norm")


def check_finite(metrics: dict[str, float], step: int) -> None:
  """Raises NonFiniteLossError naming the step (1-based, as logged) and the first non-finite term in the order the
  step computes them (TERMS_IN_COMPUTE_ORDER), with every term's value."""
  order = ([k for k in TERMS_IN_COMPUTE_ORDER if k in metrics]
           + sorted(k for k in metrics if k not in TERMS_IN_COMPUTE_ORDER))
  bad = [k for k in order if not math.isfinite(metrics[k])]
  if bad:
    terms = ", ".join(f"{k}={metrics[k]}" for k in order)
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: term {bad[0]!r} is {metrics[bad[0]]}, the first to go bad in the order "
        f"the step computes them ({terms}). Lower config.optim.base_lr/head_lr, check the input images, or resume "
        "from the last checkpoint.")


def ensure_writable_dir(path: str) -> None:
  """Creates `path` if needed and checks that files can be written in it (a clear error otherwise).

  An object-store URL (gs://...) is only created; its permissions show at the first write.
  """
  if checkpoints.is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
    return
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"workdir {path!r} is not a writable folder ({e.__class__.__name__}: {e.strerror or e}). "
        "Choose another --workdir or fix its permissions.") from e


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON atomically (write to a temp file, then rename; gs:// objects are atomic)."""
  if checkpoints.is_remote(path):
    epath.Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class MetricsLog:
  """Writes logged metrics to clu writers (console, TensorBoard) and `<workdir>/metrics.jsonl`: one history per run.

  metrics.jsonl holds one JSON object per line, {"step": s, "<kind>/<name>": value, ...}, where the kind is the
  first part of the keys ("train", "test", "validation"). A step has at most one row of each kind: writing a kind
  again at the same step replaces its row (a finished run evaluated again). `resume(step)` drops the rows logged
  after the step a run restarts from (a killed run logged them after its last checkpoint; the resumed run logs them
  again) and says so with a row {"event": "resumed", "step": s, "dropped_rows": n}. Readers of the metrics take the
  rows that have the keys they want (e.g. "train/total"); event rows have no metric keys.

  Only process 0 writes files; the other hosts log to the console. Local files are rewritten atomically (temp
  file + rename) when rows are dropped or replaced, appended to otherwise; on gs:// (no appends) the whole file is
  rewritten at each write.
  """

  def __init__(self, workdir: str):
    self.is_main = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.remote = checkpoints.is_remote(workdir)
    self.lines: list[str] = []
    if self.is_main and self.path.exists():
      self.lines = [line + "\n" for line in self.path.read_text().splitlines()]
    self._index()

  @staticmethod
  def _parse(line: str) -> Optional[dict]:
    """The JSON object of a line; None for a line that is not one (the torn last line of a killed write)."""
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      return None
    return row if isinstance(row, dict) and "step" in row else None

  @staticmethod
  def _key(row: dict) -> Optional[tuple]:
    """(step, kinds) of a metrics row; None for an event row."""
    if "event" in row:
      return None
    return int(row["step"]), tuple(sorted({k.split("/", 1)[0] for k in row if k != "step"}))

  def _index(self) -> None:
    self._rows = {}
    for i, line in enumerate(self.lines):
      row = self._parse(line)
      if row is not None and self._key(row) is not None:
        self._rows[self._key(row)] = i

  def _rewrite(self) -> None:
    text = "".join(self.lines)
    if self.remote:
      self.path.write_text(text)
    else:
      run_config.write_atomically(str(self.path), text)

  def resume(self, step: int, will_train: bool = True) -> int:
    """Drops every row logged after `step` (and any torn line of a killed write) before a run continues from the
    checkpoint at `step` (0: none); returns how many lines were dropped. Records the resume as an event row when
    lines were dropped, or when a run continues training from a checkpoint (`will_train` and step > 0).
    """
    if not self.is_main:
      return 0
    kept = [line for line in self.lines
            if (row := self._parse(line)) is not None and int(row["step"]) <= step]
    dropped = len(self.lines) - len(kept)
    self.lines = kept
    if dropped or (will_train and step > 0):
      self.lines.append(json.dumps({"event": "resumed", "step": int(step), "dropped_rows": dropped}) + "\n")
      if dropped:
        logging.info("metrics.jsonl: dropped %d row(s) logged after step %d, the step this run resumes from.",
                     dropped, step)
      self._rewrite()
    self._index()
    return dropped

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self.writer.write_scalars(step, scalars)
    if not self.is_main:
      return
    row = {"step": step, **scalars}
    line = json.dumps(row) + "\n"
    key = self._key(row)
    if key in self._rows:  # the same kind of row at the same step: the new one supersedes it.
      self.lines[self._rows[key]] = line
      self._rewrite()
      return
    self._rows[key] = len(self.lines)
    self.lines.append(line)
    if self.remote:
      self._rewrite()
    else:
      with open(self.path, "a") as f:
        f.write(line)

  def close(self) -> None:
    self.writer.flush()


@dataclasses.dataclass(frozen=True)
class Run:
  """What a config builds before training or evaluating: data, model, optimizer and the sharded state."""
  source: sources.DataSource
  num_classes: int  # identities of the ID loss.
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  total_steps: int
  state_sharding: Any  # pytree of NamedShardings, like TrainState.
  abstract_state: Any  # pytree of ShapeDtypeStructs carrying state_sharding: the target of a restore.
  init_state: Callable[[], TrainState]  # creates a fresh state, sharded.


def build_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> Run:
  """Reads the data source and builds the model, the optimizer and the sharded state constructors.

  Multi-host: process 0 reads (and, for the synthetic set, generates) the source first; the other hosts
  read it after a barrier, so a generated set is written once.
  """
  if jax.process_count() > 1 and jax.process_index() == 0:
    source = sources.load_source(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fdnm_jax.train.build_run: source ready")
  if jax.process_count() == 1 or jax.process_index() != 0:
    source = sources.load_source(config, workdir)
  num_classes = pipeline.num_classes(source.train_visible, source.train_infrared)
  steps_per_epoch = _steps_per_epoch(config, source)
  model = fdnm_from_config(config.model, num_classes)
  tx = optim.make_optimizer(config.optim, config.schedule, steps_per_epoch)
  input_shape = (1, config.input.height, config.input.width, 3)

  def init(rng, weights=None):
    return create_train_state(model, tx, rng, input_shape, weights)

  def init_state():
    # Pretrained weights: read and converted on the host only for a fresh state (a resume never calls this),
    # then passed to the jitted init as an argument and merged before tx.init.
    path = pretrained.weights_path(config.model)
    weights = pretrained.load_converted(path, model.stage_sizes, model.width) if path else None
    return init_sharded(rng, weights)

  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, rng)
  state_sharding = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  logging.info("State sharding of the largest leaves (mesh %s):\n%s", dict(mesh.shape),
               sharding.describe_shardings(abstract, state_sharding))
  init_sharded = jax.jit(init, out_shardings=state_sharding)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
  return Run(source=source, num_classes=num_classes, model=model, tx=tx, steps_per_epoch=steps_per_epoch,
             total_steps=config.schedule.num_epochs * steps_per_epoch, state_sharding=state_sharding,
             abstract_state=abstract, init_state=init_state)


def variables_of(state: TrainState) -> dict:
  """The Flax variables (params, batch_stats) of a train state."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def count_params(params: Any) -> int:
  """Number of trainable parameters (BN running statistics excluded)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _run_eval(model, state, source, config, mesh, workdir, step, log: MetricsLog,
              train_step_seconds: Optional[float] = None) -> dict:
  model, variables, recalibration = precise_bn.for_evaluation(model, variables_of(state), config, mesh, workdir, step,
                                                              source)
  results, health = evaluator.evaluate_with_health(model, variables, source, config, mesh,
                                                   state.batch_stats if recalibration else None)
  scalars = {f"{source.split}/{d}/{k}": v for d, r in results.items() for k, v in r.items() if not isinstance(v, list)}
  log.write(step, {k: float(v) for k, v in scalars.items()})
  report = {"name": config.name, "dataset": config.dataset, "protocol": source.protocol, "step": step,
            "init": pretrained.init_label(config.model), "checkpoint_dir": checkpoints.checkpoint_dir(workdir),
            "settings": results,
            "num_params": count_params(state.params), "train_step_seconds": train_step_seconds,
            "eval_split": source.split, "model_selection_split": sources.model_selection_split(source, config),
            "gallery_sampling": {s.name: s.family for s in evaluator.protocols.settings_for(source, config)},
            "embedding": config.evals.embedding, "test_flip": bool(config.evals.test_flip),
            "precise_bn": recalibration, "health": health}
  if jax.process_index() == 0:
    results_dir = epath.Path(workdir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(str(results_dir / f"{config.name}{'' if source.split == 'test' else '_' + source.split}.json"), report)
  logging.info("Evaluation at step %d (%s):\n%s", step, source.name, evaluator.format_table(results))
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates at the end.

  Before anything is written or a model is built, the whole config is validated (`run_config.validate`) and
  compared with the workdir's stored config (`run_config.check_contract`: a resume whose trained fields differ
  stops, unless `allow_config_change`, which records the change in config_history.jsonl once the run is
  restored). `<workdir>/config.json` is written once, on a fresh run, after the run is built (its data read and
  checked, the model and the state's shapes and shardings set up), so a run that fails to start binds no contract.

  Returns:
    The final evaluation report (also written to `<workdir>/results/<name>.json`).
  Raises:
    ConfigError: bad config fields (all named), or a mesh that does not fit the devices.
    WorkdirError: the workdir holds a run with other trained fields (listed), or it is not writable.
    NonFiniteLossError: a loss term became NaN/inf (the message names the step and the term).
    Preempted: a preemption notice (SIGTERM) arrived; the checkpoint of the current step is saved.
  """
  workdir = checkpoints.absolute(workdir)
  fresh = run_config.load_effective(workdir) is None
  run_config.validate(config, fresh=fresh)
  contract = run_config.check_contract(workdir, config, "resume", allow_config_change)
  weights = pretrained.weights_path(config.model)
  if contract.fresh and weights:  # names, shapes and a readable file, before the workdir is touched.
    pretrained.check_weights(weights, config.model.stage_sizes, config.model.width)
  run_config.validate_for_devices(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  if jax.process_index() == 0:  # the other hosts write only their checkpoint shards (orbax makes the folders).
    ensure_writable_dir(workdir)
  if contract.describe_free():
    logging.info("Fields that differ from the run's stored config and change only logging, checkpointing or "
                 "evaluation (allowed): %s", contract.describe_free())
  run = build_run(config, workdir, mesh)
  source = run.source
  logging.info("%s: %d train ids, %d visible + %d infrared train images; %d steps/epoch, %d steps; mesh %s; init: %s",
               source.name, run.num_classes,
               len(source.train_visible), len(source.train_infrared), run.steps_per_epoch, run.total_steps,
               dict(mesh.shape), pretrained.init_label(config.model))
  if contract.fresh and jax.process_index() == 0:
    if run_config.latest_checkpoint_step(workdir) is not None:
      logging.warning("%s has checkpoints but no config.json: writing this command's config as the run's.", workdir)
    run_config.write_stored(workdir, config)

  manager = checkpoints.make_manager(workdir, config.checkpoint)
  log = MetricsLog(workdir)
  watch = PreemptionWatch()
  try:
    if manager.latest_step() is not None:
      state, start_step = checkpoints.restore(manager, run.abstract_state)
      logging.info("Resumed from the checkpoint at step %d", start_step)
    else:
      state, start_step = run.init_state(), 0
    log.resume(start_step, will_train=start_step < run.total_steps)
    if contract.accepted and jax.process_index() == 0:
      run_config.record_segment(workdir, contract, start_step)
      logging.warning("Config changed from step %d on (--allow_config_change; recorded in %s): %s", start_step,
                      run_config.history_path(workdir), "; ".join(str(c) for c in contract.accepted))
    step_seconds = None
    if start_step < run.total_steps:
      state, step_seconds = _train_loop(config, workdir, mesh, run, state, start_step, manager, log, watch)
    else:
      logging.info("The checkpoint is at the final step %d: nothing to train.", start_step)
    return _run_eval(run.model, state, source, config, mesh, workdir, run.total_steps, log, step_seconds)
  finally:
    watch.close()
    manager.wait_until_finished()
    manager.close()
    log.close()


def _train_loop(config, workdir, mesh, run: Run, state, start_step, manager, log,
                watch: PreemptionWatch) -> tuple[TrainState, Optional[float]]:
  """Runs steps start_step..total_steps-1; returns the state and the median seconds per step after the
  first logging window (which holds the compilation), or None when there was no second window."""
  source, model, total_steps = run.source, run.model, run.total_steps
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(model, run.tx, config.loss), in_shardings=(run.state_sharding, batch_sharding),
                    out_shardings=(run.state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  batches: Iterator[dict] = pipeline.train_batches(
      source.train_visible, source.train_infrared, config.input, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  lr_factor = optim.lr_factor_fn(config.schedule, run.steps_per_epoch)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=log.writer,
                                           every_steps=config.logging.every_steps)
  images_per_step = 2 * config.input.num_ids_per_batch * config.input.num_instances
  window: list[dict] = []
  window_times: list[float] = []
  window_start = time.perf_counter()
  pending: Optional[tuple[int, dict]] = None

  def fetch(item) -> None:
    step_done, metrics = item
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(values, step_done)
    window.append(values)

  for step in range(start_step, total_steps):
    batch = next(batches)
    global_batch = sharding.host_to_global(
        {k: batch[k] for k in ("visible", "infrared", "visible_labels", "infrared_labels")}, mesh)
    state, metrics = step_fn(state, global_batch)
    # Fetch the previous step's metrics after dispatching this one, so the device queue stays full.
    if pending is not None:
      fetch(pending)
    done = step + 1
    pending = (done, metrics)
    boundary = (done % config.logging.every_steps == 0 or done == total_steps
                or (config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0)
                or (config.evals.every_steps and done % config.evals.every_steps == 0))
    if boundary:
      fetch(pending)
      pending = None
    if done % config.logging.every_steps == 0 or done == total_steps:
      elapsed = time.perf_counter() - window_start
      scalars = {f"train/{k}": float(np.mean([w[k] for w in window])) for k in window[0]}
      scalars["train/lr"] = config.optim.base_lr * float(lr_factor(step))
      scalars["train/images_per_sec"] = images_per_step * len(window) / max(elapsed, 1e-9)
      log.write(done, scalars)
      window_times.append(elapsed / len(window))
      window, window_start = [], time.perf_counter()
    report(done)
    save_now = done == total_steps or (config.checkpoint.every_steps and done % config.checkpoint.every_steps == 0)
    if save_now:  # a boundary: the metrics were checked finite above, so the state is safe to save.
      checkpoints.save(manager, done, state, force=True)
    if config.evals.every_steps and done % config.evals.every_steps == 0 and done != total_steps:
      with report.timed("eval"):
        _run_eval(model, state, sources.selection_source(source, config), config, mesh, workdir, done, log)
    if watch.reached(done, manager) and done != total_steps:
      if pending is not None:  # the state is saved only after its step's losses were checked finite.
        fetch(pending)
      if manager.latest_step() != done:
        checkpoints.save(manager, done, state, force=True)
      manager.wait_until_finished()
      raise Preempted(done, f"{checkpoints.checkpoint_dir(workdir)}/{done}")
  return state, (float(np.median(window_times[1:])) if len(window_times) > 1 else None)
