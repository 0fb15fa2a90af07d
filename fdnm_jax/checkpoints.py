"""Orbax checkpoints of the train state: save, keep the latest k (and the best by validation), resume, and fail well.

The checkpoint folder is `<workdir>/checkpoints/<step>/state` (a local path or gs://). Restoring goes into an
abstract state that carries the current mesh's shardings, so a checkpoint written on 8 devices (or with
fsdp-sharded kernels) restores onto 1 device, another mesh or another host count, and the reverse.

What can go wrong, and what happens:
- **A partial checkpoint** (a crash or a full disk during a save): orbax writes a step into
  `<step>.orbax-checkpoint-tmp*` and marks a finished one with `commit_success.txt`. Folders of either kind
  without the marker are not checkpoints: `committed_steps` ignores them and a training run removes them
  (`clean_partial`) before it opens the checkpoints.
- **An unreadable checkpoint** (a truncated or missing data file): the resume names the step and the path, moves
  the step folder aside to `<workdir>/checkpoints_quarantine/<step>-unreadable` (nothing is deleted), warns how
  many steps will be retrained and resumes from the previous checkpoint (or from scratch). A failed restore counts
  as unreadable only when a plain read of the same checkpoint (no target tree, no shardings) fails too; otherwise
  the error is ours and keeps its traceback.
- **A checkpoint of another model** (another `model.width`, ...): the shapes in the checkpoint's metadata are
  compared with the target before restoring; a mismatch is a `CheckpointError` naming the first differing arrays
  and what the caller knows of the config fields behind them.
- **Disk full or no permission while saving**: a `CheckpointError` in one line naming the step folder, the free
  space and the space the state needs; the partial folder is removed, the checkpoints saved before stay valid and
  the next start resumes from the latest of them. Orbax's own tracebacks of these errors are kept out of the log.

Model selection (`Selection`): checkpoints saved with a score keep the best one beside the latest
`checkpoint.keep` (orbax's `BestN` inside an `AnyPreservationPolicy` with `LatestN`).
"""

import contextlib
import dataclasses
import errno
import logging as py_logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from fdnm_jax import sharding
from fdnm_jax.errors import CheckpointError, FlagError, MissingFileError

COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step folder as the last act of a save.
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix of a step folder that is being written.
QUARANTINE = "checkpoints_quarantine"  # <workdir>/checkpoints_quarantine/<step>-<reason>: steps moved aside.
STATE_ITEM = "state"  # the item name of the train state inside a step folder.

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os_error_code='?(\d+)")


def is_remote(path: str) -> bool:
  """Whether `path` is a URL of an object store (gs://bucket/run), not a local path."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; an object-store URL (gs://...) unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def _join(base: str, *names: str) -> str:
  return "/".join([base.rstrip("/"), *names]) if is_remote(base) else os.path.join(base, *names)


def checkpoint_dir(workdir: str) -> str:
  """The folder holding a workdir's checkpoints (`<workdir>/checkpoints`, a local path or a gs:// URL).

  All hosts of a multi-host run write their shards of each checkpoint there, so it must be shared (GCS on a
  TPU pod, a network file system on a GPU cluster); orbax writes the metadata from process 0.
  """
  return _join(absolute(workdir), "checkpoints")


def step_path(workdir: str, step: int) -> str:
  """`<workdir>/checkpoints/<step>`."""
  return _join(checkpoint_dir(workdir), str(int(step)))


def quarantine_dir(workdir: str) -> str:
  """`<workdir>/checkpoints_quarantine`: where unreadable checkpoints are moved (never deleted)."""
  return _join(absolute(workdir), QUARANTINE)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _entries(workdir: str) -> Iterator[epath.Path]:
  folder = epath.Path(checkpoint_dir(workdir))
  if not folder.is_dir():
    return iter(())
  return (p for p in folder.iterdir() if p.is_dir())


def is_committed(step_folder: str) -> bool:
  """Whether a step folder holds a finished save (orbax's commit marker)."""
  return (epath.Path(step_folder) / COMMIT_MARKER).exists()


def committed_steps(workdir: str) -> list[int]:
  """The steps of `<workdir>/checkpoints` whose save finished (integer folder with the commit marker), ascending."""
  return sorted(int(p.name) for p in _entries(workdir) if p.name.isdigit() and is_committed(str(p)))


def partial_entries(workdir: str) -> list[str]:
  """The folders of `<workdir>/checkpoints` left by an unfinished save: orbax tmp folders, and integer step
  folders without the commit marker. Sorted by name."""
  return sorted(str(p) for p in _entries(workdir)
                if TMP_MARKER in p.name or (p.name.isdigit() and not is_committed(str(p))))


def clean_partial(workdir: str) -> list[str]:
  """Removes `partial_entries(workdir)` (call on one process); returns the removed folders.

  They hold no usable state (orbax writes the commit marker last), so removing them loses nothing and frees the
  space a full disk left taken.
  """
  removed = partial_entries(workdir)
  for path in removed:
    epath.Path(path).rmtree(missing_ok=True)
    logging.warning("Removed the unfinished checkpoint save %s (a crash or a full disk interrupted it; it holds no "
                    "usable state).", path)
  return removed


def move_aside(workdir: str, step: int, reason: str) -> str:
  """Moves `<workdir>/checkpoints/<step>` to `<workdir>/checkpoints_quarantine/<step>-<reason>[-<n>]`; returns
  the new path. Call on one process."""
  target_dir = epath.Path(quarantine_dir(workdir))
  target_dir.mkdir(parents=True, exist_ok=True)
  target, n = target_dir / f"{int(step)}-{reason}", 1
  while target.exists():
    n += 1
    target = target_dir / f"{int(step)}-{reason}-{n}"
  epath.Path(step_path(workdir, step)).rename(target)
  return str(target)


def resolve(workdir: str, checkpoint: Optional[str]) -> tuple[Optional[str], Optional[int]]:
  """Which checkpoint a command reads: (the workdir holding it, its step), or (None, None) when there is none.

  Args:
    workdir: the run's folder (checkpoints under `<workdir>/checkpoints/<step>`).
    checkpoint: None (the latest committed step of the workdir), a step number ("5000"), or a step folder
      (".../checkpoints/5000").
  Raises:
    MissingFileError: the requested step or folder does not exist or its save never finished (the message lists
      the steps there are).
    FlagError: `checkpoint` is neither a step number nor a step folder.
  """
  if checkpoint is None:
    steps = committed_steps(workdir)
    return (workdir, steps[-1]) if steps else (None, None)
  text = str(checkpoint).strip()
  if text.isdigit():
    steps = committed_steps(workdir)
    if int(text) not in steps:
      raise MissingFileError(f"--checkpoint={text}: no step {int(text)} under {checkpoint_dir(workdir)} "
                             f"(steps there: {steps or 'none'}). Pick one of those steps or a checkpoint folder.")
    return workdir, int(text)
  folder = absolute(text.rstrip("/"))
  if not epath.Path(folder).is_dir():
    raise MissingFileError(f"--checkpoint={text}: folder {folder} does not exist. Pass a step number of "
                           f"{checkpoint_dir(workdir)} or a folder <workdir>/checkpoints/<step>.")
  parent, step = os.path.split(folder)
  if not step.isdigit() or os.path.basename(parent) != "checkpoints":
    raise FlagError(f"--checkpoint={text}: expected a step number or a folder <workdir>/checkpoints/<step> "
                    f"(as training writes them), got {folder}.")
  if not is_committed(folder):
    raise MissingFileError(f"--checkpoint={text}: {folder} has no {COMMIT_MARKER}: its save never finished. Pick "
                           f"another step of {parent}.")
  return os.path.dirname(parent), int(step)


# ----------------------------------------------------------------------------------------------------------------
# Model selection.


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which checkpoint counts as the best: the highest `metric` (mean over the settings of `split`)."""
  split: str  # "validation" | "test": the split the periodic evaluations score.
  metric: str  # the metric name of the evaluator's rows (mAP, rank1, mINP).

  def metrics(self, score: float) -> dict:
    """The metrics orbax stores with a checkpoint scored `score` (JSON)."""
    return {"score": float(score), "split": self.split, "metric": self.metric}

  def score_of(self, metrics: Any) -> float:
    """The score of stored metrics; -inf for metrics of another split or metric (an earlier segment's)."""
    if not isinstance(metrics, dict) or metrics.get("split") != self.split or metrics.get("metric") != self.metric:
      return -math.inf
    return float(metrics["score"])

  def describe(self) -> str:
    return f"{self.split} {self.metric}"


def make_manager(workdir: str, ckpt_config: ml_collections.ConfigDict, read_only: bool = False,
                 selection: Optional[Selection] = None) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints` keeping the latest `ckpt_config.keep` and, with
  `selection`, the best-scored checkpoint (saves then pass `metrics=selection.metrics(score)`)."""
  if read_only:  # save and preservation options would only draw orbax warnings on a reader.
    options = ocp.CheckpointManagerOptions(save_interval_steps=0, create=False, read_only=True)
  else:
    _quiet_storage_error_logs()
    policies = [ocp.checkpoint_managers.LatestN(n=ckpt_config.keep)]
    extra = {}
    if selection is not None:
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=selection.score_of, reverse=False, n=1,
                                                    keep_checkpoints_without_metrics=False))
      extra = {"best_fn": selection.score_of, "best_mode": "max"}
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, ckpt_config.every_steps),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=ckpt_config.async_save, **extra)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False,
         metrics: Optional[dict] = None) -> bool:
  """Saves `state` at `step` if the save interval (or `force`) says so; returns whether it did.

  Orbax also saves a step when no checkpoint exists yet; callers that decide the steps themselves pass force=True.
  """
  return manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}), force=force,
                      metrics=metrics)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`: the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
  """Restores the checkpoint at `step` (default: the latest) into `abstract_state`'s shardings (no checks: see
  `TrainCheckpoints.restore_latest` for the checked resume).

  Returns:
    (state, step).
  Raises:
    MissingFileError: no checkpoint in the manager's folder.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise MissingFileError(f"no checkpoint under {manager.directory}")
  restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE_ITEM], step


# ----------------------------------------------------------------------------------------------------------------
# Reading a step: metadata, shape checks, unreadable checkpoints.


class UnreadableCheckpointError(CheckpointError):
  """A committed checkpoint whose files cannot be read (truncated, missing, corrupt)."""

  def __init__(self, step: int, path: str, reason: str):
    super().__init__(f"checkpoint step {step} at {path} cannot be read ({reason})")
    self.step, self.path, self.reason = step, path, reason


def _root_cause(exc: BaseException) -> BaseException:
  seen = set()
  while id(exc) not in seen:
    seen.add(id(exc))
    nxt = exc.__cause__ or exc.__context__
    if nxt is None:
      break
    exc = nxt
  return exc


def _short(exc: BaseException, limit: int = 300) -> str:
  """The first line of the innermost exception's message, at most `limit` characters."""
  cause = _root_cause(exc)
  text = (str(cause).strip().splitlines() or [""])[0]
  text = f"{cause.__class__.__name__}: {text}" if text else cause.__class__.__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _flat(tree: Any) -> dict[str, Any]:
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
  """Inside, the absl logger (orbax's) passes only ERROR and above; after, it has its own level again.

  The logger's level is saved and put back, not absl's verbosity: before absl parses its flags (fdnm-jax used as a
  library, a notebook, a test) `logging.get_verbosity()` is not the level in effect, and setting it back left the
  absl logger at WARNING, silencing every later INFO line of the process."""
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(py_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def state_metadata(step_folder: str, step: Optional[int] = None) -> dict:
  """The saved train state's tree of orbax ArrayMetadata (shape, dtype) under `<step_folder>/state`.

  Raises:
    UnreadableCheckpointError: the metadata cannot be read, or it is not an fdnm-jax train state.
  """
  step = int(os.path.basename(str(step_folder).rstrip("/"))) if step is None else step
  _NOISE.install()  # every read of a checkpoint starts here: a failed read's aftermath stays out of the output.
  _quiet_storage_error_logs()
  try:
    with _absl_errors_only(), ocp.StandardCheckpointer() as reader:  # orbax warns that the item folder has no
      meta = reader.metadata(_join(str(step_folder), STATE_ITEM))      # step metadata: expected here.
  except Exception as e:  # pylint: disable=broad-except  (any failure to read the files is the checkpoint's)
    _known_unreadable(str(step_folder))
    raise UnreadableCheckpointError(step, str(step_folder), f"its metadata: {_short(e)}") from e
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    _known_unreadable(str(step_folder))
    raise UnreadableCheckpointError(step, str(step_folder), "its metadata holds no 'params' tree: damaged, or not "
                                    "an fdnm-jax train state")
  return tree


@dataclasses.dataclass(frozen=True)
class ShapeMismatch:
  """How a checkpoint's arrays differ from a target tree (names are "a/b/c" tree paths)."""
  differing: tuple  # ((name, checkpoint shape/dtype, target shape/dtype), ...)
  only_in_checkpoint: tuple  # (name, ...)
  only_in_target: tuple  # (name, ...)

  def __bool__(self) -> bool:
    return bool(self.differing or self.only_in_checkpoint or self.only_in_target)

  def describe(self) -> str:
    parts = []
    if self.differing:
      name, have, want = self.differing[0]
      parts.append(f"{len(self.differing)} array(s) differ, first {name}: checkpoint {have} vs this config {want}")
    if self.only_in_checkpoint:
      parts.append(f"{len(self.only_in_checkpoint)} only in the checkpoint, first {self.only_in_checkpoint[0]}")
    if self.only_in_target:
      parts.append(f"{len(self.only_in_target)} only in this config's model, first {self.only_in_target[0]}")
    return "; ".join(parts)

  def classifier_only(self) -> bool:
    """Whether only the classifier's output width differs (another number of training identities)."""
    return (not self.only_in_checkpoint and not self.only_in_target and bool(self.differing)
            and all("classifier" in name for name, _, _ in self.differing))


def _shape_dtype(x: Any) -> str:
  return f"{tuple(int(d) for d in x.shape)} {np.dtype(x.dtype).name}"


def compare_shapes(checkpoint_tree: Any, target_tree: Any) -> ShapeMismatch:
  """Compares a checkpoint's metadata tree with a target (arrays or ShapeDtypeStructs), leaf by leaf: shapes,
  dtypes, and the leaves only one of them has."""
  have, want = _flat(checkpoint_tree), _flat(target_tree)
  differing = tuple((k, _shape_dtype(have[k]), _shape_dtype(want[k])) for k in sorted(set(have) & set(want))
                    if _shape_dtype(have[k]) != _shape_dtype(want[k]))
  return ShapeMismatch(differing, tuple(sorted(set(have) - set(want))), tuple(sorted(set(want) - set(have))))


def mismatch_error(step: int, path: str, mismatch: ShapeMismatch, fields: str, fix: str) -> CheckpointError:
  """The one-line error of a checkpoint that does not fit: the arrays, the config fields behind them, the fix.

  `fields`: what the caller knows of the config fields that differ ("model.width: 8 in the workdir's config.json,
  16 in this config"); "" when it knows none.
  """
  if not fields and mismatch.classifier_only():
    fields = ("the classifier's output width differs: the checkpoint was trained on another number of training "
              "identities (config.dataset, data.trial, data.num_val_ids or the data set's files)")
  elif not fields:
    fields = "no config field on record explains it (the checkpoint comes from another run or code version)"
  return CheckpointError(f"checkpoint step {step} at {path} does not fit this config: {mismatch.describe()}. "
                         f"{fields}. {fix}")


def _numpy_target(tree: Any) -> Any:
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def unreadable_reason(step_folder: str, metadata_tree: Any) -> Optional[str]:
  """Why a plain read of the checkpoint fails (every array to host memory, no shardings, no caller's target), or
  None when it succeeds: then a failed restore was the caller's fault, not the checkpoint's."""
  try:
    with _absl_errors_only(), ocp.StandardCheckpointer() as reader:
      reader.restore(_join(str(step_folder), STATE_ITEM), _numpy_target(metadata_tree))
  except Exception as e:  # pylint: disable=broad-except  (the question is whether anything fails)
    return _short(e)
  return None


def _restore_checked(read: Callable[[], Any], step: int, path: str, metadata_tree: Any) -> Any:
  """`read()`; if it fails and the checkpoint cannot be read plainly either, UnreadableCheckpointError."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the checkpoint itself is unreadable)
    reason = unreadable_reason(path, metadata_tree)
    if reason is None:
      raise
    _known_unreadable(path)
    raise UnreadableCheckpointError(step, path, reason) from e


def classifier_width(metadata_tree: dict) -> int:
  """The number of training identities of a checkpoint: its classifier's output width."""
  return int(metadata_tree["params"]["classifier"]["kernel"].shape[-1])


def restore_variables(step_folder: str, mesh: jax.sharding.Mesh,
                      expected: Optional[Callable[[int], Any]] = None, fields: str = "",
                      fix: str = "") -> tuple[dict, int]:
  """The Flax variables (params and BN statistics only) of the checkpoint in `step_folder`, replicated over `mesh`:
  the one restore path of evaluation, feature extraction, visualisation and the final report's best checkpoint.

  The target tree is read from the checkpoint's metadata, so neither the data set nor the optimizer is needed;
  the optimizer state and the step are not read (orbax's partial restore).

  Args:
    step_folder: `<workdir>/checkpoints/<step>`.
    expected: fn(num_classes) -> the {"params", "batch_stats"} tree (ShapeDtypeStructs) the model built from the
      config expects; its shapes are compared with the checkpoint's before anything is read.
    fields, fix: the config fields and the fix `mismatch_error` names on a mismatch.
  Returns:
    ({"params", "batch_stats"}, num_classes).
  Raises:
    UnreadableCheckpointError: the checkpoint's files cannot be read.
    CheckpointError: the checkpoint does not fit `expected`.
  """
  step = int(os.path.basename(str(step_folder).rstrip("/")))
  tree = state_metadata(step_folder, step)
  num_classes = classifier_width(tree)
  if expected is not None:
    mismatch = compare_shapes({k: tree.get(k, {}) for k in ("params", "batch_stats")}, expected(num_classes))
    if mismatch:
      raise mismatch_error(step, str(step_folder), mismatch, fields, fix)
  replicated = sharding.replicated(mesh)
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated), tree[k])
            for k in ("params", "batch_stats") if k in tree}

  def read():
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(_join(str(step_folder), STATE_ITEM), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))

  state = _restore_checked(read, step, str(step_folder), tree)
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, num_classes


def model_fields_of(params: dict) -> dict[str, Any]:
  """The model config fields a checkpoint's params reveal (FDNM's parameter names, `fdnm_jax.models`):
  model.width (the stem's output channels), model.stage_sizes (blocks per stage), model.agp_stages (AGP modules
  present), model.anm_stage > 0 (whether ANM is present), and "classes" (the classifier's outputs)."""
  fields = {}
  stem = params.get("visible_stem", {}).get("conv1", {}).get("kernel")
  if stem is not None:
    fields["model.width"] = int(stem.shape[-1])
  layers = [k for k in sorted(params) if re.fullmatch(r"layer\d+", k)]
  if layers:
    fields["model.stage_sizes"] = [sum(1 for b in params[k] if b.startswith("block")) for k in layers]
  fields["model.agp_stages"] = sorted(int(k[3:]) for k in params if re.fullmatch(r"agp\d+", k))
  fields["model.anm_stage > 0"] = "anm" in params
  if "classifier" in params:
    fields["classes"] = int(params["classifier"]["kernel"].shape[-1])
  return fields


def model_field_differences(checkpoint_params: dict, target_params: dict) -> str:
  """"model.width: 8 in the checkpoint, 16 in this config; ..." for the `model_fields_of` that differ between
  two params trees (metadata or ShapeDtypeStructs); "" when none does."""
  have, want = model_fields_of(checkpoint_params), model_fields_of(target_params)
  out = []
  for key in have:
    if key in want and have[key] != want[key]:
      if key == "classes":
        out.append(f"the classifier has {have[key]} outputs in the checkpoint and {want[key]} here (another number of "
                   "training identities: config.dataset, data.trial, data.num_val_ids or the data set's files)")
      else:
        out.append(f"{key}: {have[key]} in the checkpoint, {want[key]} in this config")
  return "; ".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Saving: storage errors in one line.


def storage_errno(exc: BaseException) -> Optional[int]:
  """The errno of a disk-full or permission error anywhere in `exc` (its chain, exception groups, TensorStore's
  "[os_error_code=28]" messages), or None."""
  stack, seen = [exc], set()
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    codes = [e.errno] if isinstance(e, OSError) and e.errno is not None else []
    codes += [int(a or b) for a, b in _ERRNO_IN_TEXT.findall(str(e))]
    for code in codes:
      if code in _DISK_FULL | _NO_PERMISSION:
        return code
    stack += [e.__cause__, e.__context__] + list(getattr(e, "exceptions", ()))
  return None


_UNREADABLE_PATHS: set = set()  # step folders found unreadable in this process (their read errors are reported).
# "<step folder>.orbax-checkpoint-tmp" of the saves that hit a storage error in this process: the save's other
# write threads can still be running when the partial folder is removed, and their "No such file or directory"
# errors (logged by orbax with a traceback) are the aftermath of the error reported in one line.
_FAILED_SAVE_TMP_PATHS: set = set()


def _reported_paths() -> set:
  return _UNREADABLE_PATHS | _FAILED_SAVE_TMP_PATHS


def _known_unreadable(path: str) -> None:
  """Records a step folder as unreadable: the errors of its other, never-awaited read tasks stay out of the log."""
  _quiet_storage_error_logs()
  _NOISE.install()
  _UNREADABLE_PATHS.add(str(path).rstrip("/") + "/")


def _known_failed_save(step_folder: str) -> None:
  """Records the save of `step_folder` as failed (reported): orbax's errors about files in its partial folder, which
  is removed while the save's other write threads may still run, stay out of the log."""
  _quiet_storage_error_logs()
  _FAILED_SAVE_TMP_PATHS.add(str(step_folder).rstrip("/") + TMP_MARKER)


def _chain_text(exc: Optional[BaseException]) -> str:
  parts, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    parts.append(str(exc))
    exc = exc.__cause__ or exc.__context__
  return "\n".join(parts)


class _DropReportedErrorLogs(py_logging.Filter):
  """Keeps ERROR records (with their tracebacks) of errors fdnm-jax reports itself in one line out of the log:
  disk-full / permission errors of a save (orbax's records, on the absl logger, and asyncio's "Task exception was
  never retrieved" of the failed save's write tasks, and their errors about files in its partial folder, removed
  under them: `_known_failed_save`), and the read errors of a checkpoint found unreadable (asyncio's
  records of its other read tasks: hundreds of TensorStore lines apiece)."""

  def __init__(self, orbax_only: bool):
    super().__init__()
    self.orbax_only = orbax_only

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR or (self.orbax_only and "/orbax/" not in str(record.pathname)):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    text = record.getMessage() + "\n" + _chain_text(exc)
    if storage_errno(Exception(text)) is not None or (exc is not None and storage_errno(exc) is not None):
      return False
    return not any(path in text for path in _reported_paths())


_FILTERS = {"absl": _DropReportedErrorLogs(orbax_only=True), "asyncio": _DropReportedErrorLogs(orbax_only=False)}


def _quiet_storage_error_logs() -> None:
  for name, log_filter in _FILTERS.items():
    logger = py_logging.getLogger(name)
    if log_filter not in logger.filters:
      logger.addFilter(log_filter)


def _is_reported_noise(unraisable: Any) -> bool:
  """Whether an unraisable exception is the aftermath of an error fdnm-jax reports itself: "Event loop is closed"
  raised in `call_soon_threadsafe` for the write callbacks of a failed save (no object), or the error of a
  never-awaited read or write coroutine of a checkpoint found unreadable or of a save that hit a storage error."""
  exc = unraisable.exc_value
  if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and unraisable.object is None
      and exc.__traceback__ is not None
      and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(exc.__traceback__))):
    return True
  if exc is None or unraisable.object is None or not hasattr(unraisable.object, "cr_code"):  # coroutines only.
    return False
  text = _chain_text(exc)
  return storage_errno(exc) is not None or any(path in text for path in _reported_paths())


class _ReportedErrorNoise:
  """A `sys.unraisablehook` that drops the tracebacks Python prints, one apiece, for what orbax's TensorStore
  futures and coroutines leave behind after a failed save or an unreadable checkpoint (`_is_reported_noise`), and
  passes every other unraisable exception on. Installed while a training run's checkpoints are open and once a
  checkpoint was found unreadable."""

  def __init__(self):
    self.previous = None

  def __call__(self, unraisable: Any) -> None:
    if not _is_reported_noise(unraisable):
      (self.previous or sys.__unraisablehook__)(unraisable)

  def install(self) -> None:
    if sys.unraisablehook is not self:
      self.previous, sys.unraisablehook = sys.unraisablehook, self

  def uninstall(self) -> None:
    if sys.unraisablehook is self:
      sys.unraisablehook = self.previous or sys.__unraisablehook__


_NOISE = _ReportedErrorNoise()


def state_bytes(state: Any) -> int:
  """Bytes of the arrays of `state` (global shapes): an upper bound of a checkpoint's data (orbax compresses)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def _free_bytes(path: str) -> Optional[int]:
  if is_remote(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def _size(n: Optional[int]) -> str:
  """Bytes in KiB / MiB / GiB (one decimal)."""
  if n is None:
    return "unknown"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def save_error(exc: BaseException, workdir: str, step: int, needed: int) -> Optional[CheckpointError]:
  """The one-line CheckpointError of a disk-full or permission error while saving `step`, or None for others."""
  code = storage_errno(exc)
  if code is None:
    return None
  path = step_path(workdir, step)
  previous = [s for s in committed_steps(workdir) if s != step]
  resume = (f"the checkpoints saved before are intact (latest: step {previous[-1]}) and rerunning the same command "
            f"resumes from it" if previous else "no earlier checkpoint exists: rerunning the command starts over")
  if code in _DISK_FULL:
    what = (f"{os.strerror(code).lower()} ({_size(_free_bytes(path))} free there; the checkpoint needs up to "
            f"{_size(needed)}, the train state before compression)")
    fix = "Free space on that disk or move the workdir to a larger one"
  else:
    what = f"{os.strerror(code).lower()}"
    fix = f"Make {checkpoint_dir(workdir)} writable (or move the workdir)"
  return CheckpointError(f"cannot save the checkpoint of step {step} to {path}: {what}. {fix}; {resume}.")


def _remove_tmp_of(workdir: str, step: int, attempts: int = 1, delay_s: float = 0.05) -> bool:
  """Removes the partial folders of `step` (its tmp folders, an uncommitted step folder); True when none is left.

  With `attempts` > 1, tries again after `delay_s` seconds while one is left: a failed async save's other writes
  (TensorStore's threads) can still add files while its folder is being removed, and the removal then fails
  (directory not empty) or the folder reappears.
  """
  def partial(p):
    return p.name.startswith(f"{int(step)}{TMP_MARKER}") or (p.name == str(int(step)) and not is_committed(str(p)))

  for attempt in range(attempts):
    for p in _entries(workdir):
      if partial(p):
        try:
          p.rmtree(missing_ok=True)
        except OSError:
          pass
    if not any(partial(p) for p in _entries(workdir)):
      return True
    if attempt + 1 < attempts:
      time.sleep(delay_s)
  return False


# ----------------------------------------------------------------------------------------------------------------
# A training run's checkpoints.


class TrainCheckpoints:
  """The checkpoints of one training run: partial saves cleaned, checked resume with fallback, saves whose
  storage errors end in one line, and the best checkpoint under `selection`.

  Multi-host: every host makes one; process 0 alone removes, moves and writes metadata, behind barriers.
  """

  def __init__(self, workdir: str, ckpt_config: ml_collections.ConfigDict,
               selection: Optional[Selection] = None):
    self.workdir = absolute(workdir)
    self.selection = selection
    self.async_save = bool(ckpt_config.async_save)
    if jax.process_index() == 0:
      clean_partial(self.workdir)
    _barrier("fdnm_jax.checkpoints: partial saves cleaned")
    self.manager = make_manager(self.workdir, ckpt_config, selection=selection)
    self._pending: Optional[tuple[int, int]] = None  # (step, bytes) of an async save not yet waited for.
    self._failed = False
    self._failed_step: Optional[int] = None  # the step of a save that hit a storage error (its partial folder).
    _NOISE.install()
    self.retrained: Optional[dict] = None  # what a fallback resume lost: {"from", "to", "steps", "moved"}.

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _raise_storage(self, exc: BaseException, step: int, needed: int) -> None:
    error = save_error(exc, self.workdir, step, needed)
    if error is None:
      raise exc
    self._failed, self._failed_step = True, step
    _known_failed_save(step_path(self.workdir, step))
    if jax.process_index() == 0:
      _remove_tmp_of(self.workdir, step)
    raise error from None

  def save(self, step: int, state: Any, score: Optional[float] = None) -> None:
    """Saves `state` at `step` (with its selection `score`, when given).

    Raises:
      CheckpointError: the disk is full or not writable (this save's or an earlier async save's).
    """
    pending, self._pending = self._pending, None
    needed = state_bytes(state)
    metrics = self.selection.metrics(score) if self.selection is not None and score is not None else None
    try:
      save(self.manager, step, state, force=True, metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except  (only storage errors are converted; others re-raised)
      if storage_errno(e) is None:
        raise
      # Orbax first waits for the previous async save: the error is that step's when it never committed.
      failed = pending if pending and not is_committed(step_path(self.workdir, pending[0])) else (step, needed)
      self._raise_storage(e, *failed)
    if self.async_save:
      self._pending = (step, needed)

  def wait(self) -> None:
    """Waits for an async save. Raises CheckpointError on a storage error."""
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if pending is None:
        raise
      self._raise_storage(e, *pending)

  def close(self) -> None:
    self.manager.close()
    if self._failed_step is not None and jax.process_index() == 0:
      # An async save's other writes can still land in its tmp folder after the first one failed, also after the
      # manager is closed (TensorStore's write threads are not all joined): remove what they left, for up to ~2 s.
      if not _remove_tmp_of(self.workdir, self._failed_step, attempts=40, delay_s=0.05):
        logging.warning("the partial folder of the failed save of step %d is still being written; the next run "
                        "removes it (checkpoints.clean_partial)", self._failed_step)
    if not self._failed and not _UNREADABLE_PATHS:  # else the hook stays for the callbacks still to come.
      _NOISE.uninstall()

  def best(self) -> Optional[tuple[int, float]]:
    """(step, score) of the best-scored checkpoint of this selection still on disk, or None."""
    if self.selection is None:
      return None
    scored = [(self.selection.score_of(self.manager.metrics(s)), s) for s in self.manager.all_steps()]
    scored = [(v, s) for v, s in scored if v > -math.inf]
    if not scored:
      return None
    value, step = max(scored)  # ties: the later step (as orbax's BestN keeps it).
    return step, value

  def scores(self) -> dict[int, float]:
    """{step: score} of the scored checkpoints of this selection still on disk."""
    if self.selection is None:
      return {}
    out = {s: self.selection.score_of(self.manager.metrics(s)) for s in self.manager.all_steps()}
    return {s: v for s, v in out.items() if v > -math.inf}

  def restore_latest(self, abstract_state: Any, fields: Callable[[dict], str], fix: str) -> tuple[Optional[Any], int]:
    """Restores the latest readable checkpoint into `abstract_state`: (state, step), or (None, 0) when none is left.

    An unreadable checkpoint is moved aside (`move_aside`, reason "unreadable") with a warning naming the step, the
    path, where it went and the steps that will be retrained; then the previous one is tried.

    Args:
      fields: fn(the checkpoint's metadata tree) -> the config fields behind a mismatch (`mismatch_error`).
      fix: the fix a mismatch error proposes.
    Raises:
      CheckpointError: the latest checkpoint does not fit `abstract_state` (another model): nothing is moved.
    """
    lost_from = None
    while True:
      step = self.manager.latest_step()
      if step is None:
        break
      path = step_path(self.workdir, step)
      try:
        tree = state_metadata(path, step)
        mismatch = compare_shapes(tree, abstract_state)
        if mismatch:
          raise mismatch_error(step, path, mismatch, fields(tree), fix)
        state = _restore_checked(lambda: restore(self.manager, abstract_state, step)[0], step, path, tree)
      except UnreadableCheckpointError as e:
        lost_from = step if lost_from is None else lost_from
        moved = move_aside(self.workdir, step, "unreadable") if jax.process_index() == 0 else quarantine_dir(
            self.workdir)
        _barrier("fdnm_jax.checkpoints: unreadable checkpoint moved")
        self.manager.reload()
        previous = self.manager.latest_step() or 0
        logging.warning("%s; moved it to %s. Resuming from %s instead: steps %d-%d (%d steps) will be retrained.",
                        e, moved, f"the checkpoint at step {previous}" if previous else "scratch (no readable "
                        "checkpoint left)", previous + 1, lost_from, lost_from - previous)
        self.retrained = {"from": previous, "to": lost_from, "steps": lost_from - previous, "moved": moved}
        continue
      return state, step
    return None, 0
