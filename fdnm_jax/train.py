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

from fdnm_jax import (checkpoints, distributed, losses, optim, platform, precise_bn, pretrained, run_config,
                      sharding)
from fdnm_jax.errors import ConfigError, NonFiniteLossError, WorkdirError
from fdnm_jax.evaluation import evaluator, face
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


# Diagnostics the model sows (collection "diagnostics") -> the train metric that logs their mean over modules.
DIAGNOSTICS = {"agp_near_cut_fraction": "agp_near_cut"}


def diagnostic_metrics(diagnostics: Any) -> dict[str, jax.Array]:
  """Train metrics from the "diagnostics" collection of one forward pass: for each name of DIAGNOSTICS the mean
  over every module (and every sown call) that sowed it, float32; names no module sowed are left out.

  agp_near_cut: the fraction of AGP's spectrum bins whose phase sits near the -pi/pi cut (frequency.AGP), mean
  over the AGP modules: how many bins the formula's discontinuity can flip.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(diagnostics)) if diagnostics else {}
  out = {}
  for name, metric in DIAGNOSTICS.items():
    values = [jnp.mean(jnp.asarray(v, jnp.float32)) for path, sown in flat.items() if path[-1] == name
              for v in (sown if isinstance(sown, tuple) else (sown,))]
    if values:
      out[metric] = jnp.mean(jnp.stack(values))
  return out


def make_train_step(model: Any, tx: optax.GradientTransformation, loss_config: ml_collections.ConfigDict):
  """fn(state, batch) -> (state, metrics): one SGD step on a cross-modality batch.

  batch: "visible", "infrared" float32 [b, H, W, 3]; "visible_labels", "infrared_labels" int32 [b].
  metrics: loss terms (float32 scalars) by name ("total", "id", "triplet", ...) and "grad_norm"; with AGP also
  "agp_near_cut" (`diagnostic_metrics`).
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    labels = jnp.concatenate([batch["visible_labels"], batch["infrared_labels"]])
    modality = jnp.concatenate([jnp.zeros_like(batch["visible_labels"]), jnp.ones_like(batch["infrared_labels"])])

    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                     batch["visible"], batch["infrared"], train=True,
                                     mutable=["batch_stats", "diagnostics"])
      total, terms = losses.total_loss(outputs, labels, modality, loss_config)
      return total, (terms, updates["batch_stats"], updates.get("diagnostics", {}))

    grads, (terms, batch_stats, diagnostics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    metrics = {k: v.astype(jnp.float32) for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
    metrics.update(diagnostic_metrics(diagnostics))
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
  init_sharded = jax.jit(init, out_shardings=state_sharding,  # compiled once: a cheaper level on the CPU.
                         compiler_options=platform.init_compiler_options(mesh.devices.flat[0].platform))
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


def _run_eval(model, variables, source, config, mesh, workdir, step, log: Optional[MetricsLog],
              train_step_seconds: Optional[float] = None, write: bool = True) -> dict:
  """Scores `variables` on every protocol setting of `source` and returns the report; logs the scalars under
  `<split>/...` at `step` (unless `log` is None) and writes `results/<name>[_<split>].json` (unless not `write`).
  With config.evals.recalibrate_bn_batches, the BatchNorm statistics are re-estimated first (`precise_bn`)."""
  model, eval_variables, recalibration = precise_bn.for_evaluation(model, variables, config, mesh, workdir, step,
                                                                   source)
  results, health = evaluator.evaluate_with_health(model, eval_variables, source, config, mesh,
                                                   variables["batch_stats"] if recalibration else None)
  scalars = {f"{source.split}/{d}/{k}": v for d, r in results.items() for k, v in r.items() if not isinstance(v, list)}
  if log is not None:
    log.write(step, {k: float(v) for k, v in scalars.items()})
  report = {"name": config.name, "dataset": config.dataset, "protocol": source.protocol, "step": step,
            "init": pretrained.init_label(config.model), "checkpoint_dir": checkpoints.checkpoint_dir(workdir),
            "settings": results,
            "num_params": count_params(variables["params"]), "train_step_seconds": train_step_seconds,
            "eval_split": source.split, "model_selection_split": sources.model_selection_split(source, config),
            "gallery_sampling": {s.name: s.family for s in evaluator.protocols.settings_for(source, config)},
            "embedding": config.evals.embedding, "test_flip": bool(config.evals.test_flip),
            "precise_bn": recalibration, "health": health}
  if write:
    _write_report(workdir, config, source.split, report)
  logging.info("Evaluation at step %d (%s):\n%s", step, source.name, evaluator.format_table(results))
  return report


def _write_report(workdir: str, config: ml_collections.ConfigDict, split: str, report: dict) -> None:
  if jax.process_index() == 0:
    results_dir = epath.Path(workdir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(str(results_dir / f"{config.name}{'' if split == 'test' else '_' + split}.json"), report)


# Model selection: which periodic evaluations pick the checkpoint the final report scores beside the last one.

RANKING_METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")  # config.evals.select_metric choices.


def selection_of(source: sources.DataSource, config: ml_collections.ConfigDict) -> Optional[checkpoints.Selection]:
  """The model selection of a run (`sources.selection_split`), or None when it selects nothing.

  Raises:
    ConfigError: config.evals.select_metric is not a metric of the selection split's protocol.
  """
  split = sources.selection_split(source, config)
  if split is None:
    return None
  metric = config.evals.get("select_metric", "mAP")
  protocol = sources.selection_source(source, config).protocol
  allowed = face.METRICS if protocol == "face" else RANKING_METRICS
  if metric not in allowed:
    raise ConfigError(f"config.evals.select_metric={metric!r}: the {split} evaluations ({protocol} protocol) report "
                      f"{', '.join(allowed)}; pick one of those.")
  return checkpoints.Selection(split, metric)


def selection_score(results: dict, selection: checkpoints.Selection) -> float:
  """The score a selection evaluation gives a checkpoint: the mean of `selection.metric` over its settings."""
  return float(np.mean([r[selection.metric] for r in results.values()]))


def _selected_label(selection: checkpoints.Selection) -> str:
  if selection.split == "test":
    return "best on test (selected on the test set: not a held-out result)"
  return f"best on {selection.split}"


def _final_report(run: "Run", state: TrainState, config, mesh, workdir, log: MetricsLog,
                  ckpts: checkpoints.TrainCheckpoints, selection: Optional[checkpoints.Selection],
                  step_seconds: Optional[float]) -> dict:
  """Scores the last state and, under model selection, the best-scored checkpoint on the test protocols.

  The report (results/<name>.json) keeps the last model's numbers at the top ("step", "settings") and adds
  "models": [{"label": "last", ...}, {"label": "best on validation", "step", "selected_on", "selection_metric",
  "selection_score", "settings"}] and "model_selection" (the split, the metric, the scores of the kept
  checkpoints, or why nothing was selected).
  """
  total = run.total_steps
  report = _run_eval(run.model, variables_of(state), run.source, config, mesh, workdir, total, log, step_seconds,
                     write=False)
  models = [{"label": "last", "step": total, "selected_on": None, "settings": report["settings"]}]
  if selection is None:
    report["model_selection"] = {"split": None, "reason": _no_selection_reason(config)}
  else:
    best = ckpts.best()
    report["model_selection"] = {"split": selection.split, "metric": selection.metric,
                                 "every_steps": int(config.evals.every_steps),
                                 "kept_scores": {str(s): v for s, v in sorted(ckpts.scores().items())},
                                 "best_step": None if best is None else best[0],
                                 "best_score": None if best is None else best[1]}
    if best is not None:
      step, score = best
      settings = report["settings"]
      if step != total:
        variables, _ = checkpoints.restore_variables(
            checkpoints.step_path(workdir, step), mesh, expected=lambda n: variables_of(run.abstract_state),
            fix="The kept best checkpoint does not fit the run that wrote it: report this as a bug.")
        settings = _run_eval(run.model, variables, run.source, config, mesh, workdir, step, None,
                             write=False)["settings"]
      models.append({"label": _selected_label(selection), "step": step, "selected_on": selection.split,
                     "selection_metric": selection.metric, "selection_score": score, "settings": settings})
  report["models"] = models
  if ckpts.retrained:
    report["resume_fallback"] = ckpts.retrained
  _write_report(workdir, config, "test", report)
  return report


def _no_selection_reason(config: ml_collections.ConfigDict) -> str:
  if not config.evals.get("every_steps", 0):
    return "no periodic evaluations (config.evals.every_steps = 0): the last step is reported"
  return ("no validation split (config.data.num_val_ids = 0) and config.evals.select_on_test is off: the periodic "
          "evaluations are only logged, the last step is reported")


def format_final_report(report: dict) -> str:
  """The printed summary of a training run: one table per reported model (last; best on the selection split),
  each labelled with its step and the split that selected it."""
  lines = [f"{report['name']} ({report['dataset']}, step {report['step']}, {report.get('init', 'init unknown')}): "
           f"{report.get('eval_split', 'test')} protocols"]
  for m in report.get("models") or [{"label": "last", "step": report["step"], "settings": report["settings"]}]:
    how = "" if not m.get("selected_on") else (
        f", selected by {m['selected_on']} {m['selection_metric']} = {m['selection_score']:.2f}")
    lines += ["", f"{m['label']} (step {m['step']}{how}):", evaluator.format_table(m["settings"])]
  selection = report.get("model_selection") or {}
  if selection.get("split") is None and selection.get("reason"):
    lines += ["", f"model selection: none ({selection['reason']})."]
  return "\n".join(lines)


def _mismatch_fields(tree: dict, target_params: Any, workdir: str, config: ml_collections.ConfigDict) -> str:
  """The config fields behind a checkpoint that does not fit: those its params reveal, and the model fields the
  workdir's config.json records otherwise."""
  parts = [checkpoints.model_field_differences(tree.get("params", {}), target_params)]
  stored = run_config.load_effective(workdir)
  if stored is not None:
    changed = [str(c) for c in run_config.diff(stored, config) if c.role == "trained" and c.key.startswith("model.")]
    if changed:
      parts.append("config.json -> this config: " + ", ".join(changed))
  return "; ".join(p for p in parts if p)


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

  selection = selection_of(source, config)
  ckpts = checkpoints.TrainCheckpoints(workdir, config.checkpoint, selection)
  log = MetricsLog(workdir)
  watch = PreemptionWatch()
  try:
    state, start_step = ckpts.restore_latest(
        run.abstract_state, lambda tree: _mismatch_fields(tree, run.abstract_state.params, workdir, config),
        fix="Resume with the config this workdir was trained with (its config.json), or train this config in a new "
            "--workdir.")
    if state is None:
      state = run.init_state()
    else:
      logging.info("Resumed from the checkpoint at step %d", start_step)
    log.resume(start_step, will_train=start_step < run.total_steps)
    if contract.accepted and jax.process_index() == 0:
      run_config.record_segment(workdir, contract, start_step)
      logging.warning("Config changed from step %d on (--allow_config_change; recorded in %s): %s", start_step,
                      run_config.history_path(workdir), "; ".join(str(c) for c in contract.accepted))
    step_seconds = None
    if start_step < run.total_steps:
      state, step_seconds = _train_loop(config, workdir, mesh, run, state, start_step, ckpts, selection, log, watch)
    else:
      logging.info("The checkpoint is at the final step %d: nothing to train.", start_step)
    return _final_report(run, state, config, mesh, workdir, log, ckpts, selection, step_seconds)
  finally:
    watch.close()
    try:
      ckpts.wait()
    finally:
      ckpts.close()
      log.close()


def _train_loop(config, workdir, mesh, run: Run, state, start_step, ckpts: checkpoints.TrainCheckpoints,
                selection: Optional[checkpoints.Selection], log, watch: PreemptionWatch
                ) -> tuple[TrainState, Optional[float]]:
  """Runs steps start_step..total_steps-1; returns the state and the median seconds per step after the
  first logging window (which holds the compilation), or None when there was no second window.

  Checkpoints: every config.checkpoint.every_steps and at the end. Under model selection (`selection`), every
  periodic evaluation and the last step score the selection split first and save a checkpoint with that score
  (orbax keeps the best beside the latest); without it, periodic evaluations are only logged.
  """
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
    eval_now = bool(config.evals.every_steps) and done % config.evals.every_steps == 0
    if selection is not None and (eval_now or done == total_steps):  # score first: the save stores the score.
      with report.timed("eval"):
        result = _run_eval(model, variables_of(state), sources.selection_source(source, config), config, mesh,
                           workdir, done, log)
      score = selection_score(result["settings"], selection)
      log.write(done, {f"selection/{selection.split}_{selection.metric}": score})
      ckpts.save(done, state, score=score)  # a boundary: the losses were checked finite above.
    else:
      if save_now:  # a boundary: the metrics were checked finite above, so the state is safe to save.
        ckpts.save(done, state)
      if eval_now and done != total_steps:
        with report.timed("eval"):
          _run_eval(model, variables_of(state), sources.selection_source(source, config), config, mesh, workdir,
                    done, log)
    if watch.reached(done, ckpts.manager) and done != total_steps:
      if pending is not None:  # the state is saved only after its step's losses were checked finite.
        fetch(pending)
      if ckpts.latest_step() != done:
        ckpts.save(done, state)
      ckpts.wait()
      raise Preempted(done, checkpoints.step_path(workdir, done))
  return state, (float(np.median(window_times[1:])) if len(window_times) > 1 else None)
