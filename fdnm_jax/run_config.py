"""A workdir's config as the run's contract: the stored `config.json`, and which fields a later command may change.

Training writes `<workdir>/config.json` once, on a fresh run. Every later command on that workdir (a resume,
`--mode=eval`, `extract`, `visualize`) compares its config with the stored one, field by field:

- **trained** fields change the trained function or the batch stream (model, loss, optimiser, schedule, the
  training input and augmentation, the data split, the synthetic generator, the seed): a resume with another value
  would mix two runs, an evaluation with another model field would score another model.
- **free** fields change only where things go or how they are logged, checkpointed, evaluated or drawn (evals,
  checkpoint, logging, visualize, mesh, the run name, the eval batch size, prefetch, where the data set lives):
  they may differ; callers list them in the log.

`field_role` decides per dotted field name; `diff` lists what differs between two configs.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import ml_collections

CONFIG_FILE = "config.json"

# Fields (dotted names or section prefixes ending in ".") that never change the trained function or the batch stream.
FREE_FIELDS = (
    "name",
    "evals.", "checkpoint.", "logging.", "visualize.", "mesh.",
    "input.eval_batch_size", "input.prefetch",
    "data.root", "data.data_dir",  # where the same data set lives (a moved or prepared copy).
)


def field_role(key: str) -> str:
  """"free" or "trained" for a dotted config field name such as "model.width" (see the module docstring)."""
  for free in FREE_FIELDS:
    if key == free or (free.endswith(".") and key.startswith(free)):
      return "free"
  return "trained"


def _plain(value: Any) -> Any:
  """A JSON-comparable value: tuples and lists as lists (config.json stores tuples as lists)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1} for a ConfigDict or a dict; sequences become lists."""
  items = config.items() if hasattr(config, "items") else []
  out = {}
  for k, v in items:
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flatten(v, key + "."))
    else:
      out[key] = _plain(v)
  return out


@dataclasses.dataclass(frozen=True)
class FieldChange:
  """One field whose value differs between the stored config (`old`) and a new one (`new`)."""
  key: str
  old: Any
  new: Any
  role: str  # "trained" | "free" (field_role)

  def __str__(self) -> str:
    return f"{self.key}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


_MISSING = "<absent>"


def diff(old: Any, new: Any) -> list[FieldChange]:
  """The fields whose values differ between two configs (ConfigDicts or dicts), sorted by name.

  A field present in only one of them counts as a difference (its other value is "<absent>").
  """
  a, b = flatten(old), flatten(new)
  return [FieldChange(k, a.get(k, _MISSING), b.get(k, _MISSING), field_role(k))
          for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]


def _tuples(obj: Any) -> Any:
  """JSON lists back to tuples (config.json stores the config's tuples as lists)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def _merged(defaults: dict, saved: dict) -> dict:
  """`saved` over `defaults`, section by section: fields a newer fdnm-jax added keep their defaults."""
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
  return out


def config_path(workdir: str) -> str:
  """`<workdir>/config.json`."""
  return os.path.join(os.path.abspath(workdir), CONFIG_FILE)


def load_stored(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config a workdir was trained with (`<workdir>/config.json`) over `configs/default.py`, so that a run
  written by an older version gets the defaults of the fields it lacks; None when the workdir has no config.json."""
  from configs import default  # pylint: disable=g-import-not-at-top
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    saved = _tuples(json.load(f))
  return ml_collections.ConfigDict(_merged(default.get_config().to_dict(), saved))


# ----------------------------------------------------------------------------------------------------------------
# Evaluating a workdir (`--mode=eval|extract|visualize`): which fields of a given --config may differ from the
# stored one. (The checkpoint/eval block, kept apart from the training contract above.)

# Fields that fix the evaluated function or the test set: another value would score another model or other images.
EVAL_FIXED_FIELDS = (
    "model.",  # every model field, parameter-free ones too (anm_keep_original, spectral_transform, dtype, ...)
    "input.height", "input.width",  # the test-time resize the model was trained for.
    "dataset", "data.trial", "data.fold", "data.modality_folder_suffix", "synthetic.",  # the test split.
)
EVAL_TRAINING_ONLY_FIELDS = ("model.pretrained",)  # model fields that only chose the initial weights.


def eval_role(key: str) -> str:
  """"fixed", "free" or "training-only" for evaluation, of a dotted field name.

  fixed: must equal the stored value (EVAL_FIXED_FIELDS); free: the run's free fields (`field_role`) and
  data.skip_missing_images (how the test lists are read), taken from the given config; training-only: the rest
  (loss, optimiser, schedule, augmentation, seed, data.num_val_ids, model.pretrained), which evaluation ignores.
  """
  if key in EVAL_TRAINING_ONLY_FIELDS:
    return "training-only"
  for fixed in EVAL_FIXED_FIELDS:
    if key == fixed or (fixed.endswith(".") and key.startswith(fixed)):
      return "fixed"
  if field_role(key) == "free" or key == "data.skip_missing_images":
    return "free"
  return "training-only"


def eval_mismatches(stored: Any, given: Any) -> list[FieldChange]:
  """The fixed-for-evaluation fields (`eval_role`) whose values differ between the stored config and a given one."""
  return [c for c in diff(stored, given) if eval_role(c.key) == "fixed"]


def _set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *sections, leaf = key.split(".")
  node = config
  for name in sections:
    node = node[name]
  with node.unlocked():
    node[leaf] = value


def _get_dotted(config: Any, key: str) -> Any:
  node = config
  for name in key.split("."):
    node = node[name]
  return node


def eval_config(stored: ml_collections.ConfigDict, given: ml_collections.ConfigDict
                ) -> tuple[ml_collections.ConfigDict, list[FieldChange], list[FieldChange]]:
  """The config an evaluation of a workdir runs with: the stored one, with the free fields of `given`.

  Returns:
    (config, overridden: the free fields taken from `given`, ignored: the training-only fields that differ).
    Call `eval_mismatches` first: fixed fields are not checked here.
  """
  config = ml_collections.ConfigDict(stored.to_dict())
  changes = diff(stored, given)
  overridden = [c for c in changes if eval_role(c.key) == "free" and c.new is not _MISSING]
  for c in overridden:
    _set_dotted(config, c.key, _get_dotted(given, c.key))
  ignored = [c for c in changes if eval_role(c.key) == "training-only"]
  return config, overridden, ignored
