"""A workdir's config as the run's contract: validation, the stored `config.json`, and which fields may change.

One run, one workdir, one contract:

1. `validate(config, fresh=...)` checks the whole config (types against `configs/default.py`, ranges, signs,
   choices, fields that depend on each other or on the data set) and raises one `ConfigError` that names every
   bad field. It imports neither JAX nor TensorFlow, so `main.py` calls it before those imports.
2. Training writes `<workdir>/config.json` once, on a fresh run (atomically), after the run is built.
3. Every later command on the workdir compares its config with the stored one (`check_contract`), field by field:

   - **trained** fields change the trained function or the batch stream (model, loss, optimiser, schedule, the
     training input and augmentation, the data split, the synthetic generator, the seed): a resume with another
     value would mix two runs. It stops, listing the fields, unless the caller allows the change
     (`main.py --allow_config_change`); an allowed change is recorded as a new segment of the run's history in
     `<workdir>/config_history.jsonl` with the step it took effect (`record_segment`); config.json keeps the
     original. Later commands compare with the latest segment (`load_effective`).
   - **free** fields change only where things go or how they are logged, checkpointed, evaluated or drawn (evals,
     checkpoint, logging, visualize, mesh, the run name, the eval batch size, prefetch, where the data set lives):
     they may differ; callers list them in the log.
   - For evaluation (`purpose="evaluate"`: `--mode=eval|extract|visualize` with a `--config`), only the fields that
     define the network function or the test data (`blocks_evaluation`: model.* but the init, the input size, the
     data set, its split or fold, the held-out ids, the synthetic generator) must match; every other field may
     differ, and `Contract.config` is the stored config with the given config's free fields put in (the trained
     fields that do not block evaluation keep the run's values).

`field_role` decides per dotted field name; `diff` lists what differs between two configs.

From-scratch runs: `model.pretrained` "" and "none" both mean random init (`"none"` is what a user types to confirm
it where the data-set configs require ImageNet weights, `model.require_pretrained`); config.json stores "none"
(`canonical`), so a from-scratch run says so in its config.
"""

import dataclasses
import datetime
import difflib
import json
import math
import os
import re
from typing import Any, Callable, Optional, Sequence

import ml_collections

from fdnm_jax.errors import ConfigError, WorkdirError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

DATASETS = ("synthetic", "regdb", "sysu", "llcm", "casia_nir_vis")  # = input_pipeline.sources.KNOWN_DATASETS.
# Data sets read from config.data.root (or a prepared config.data.data_dir): the download's folder and its layout.
DOWNLOADED = {  # dataset -> (its folder's usual name, what the folder holds).
    "regdb": ("RegDB", "Visible/, Thermal/, idx/"),
    "sysu": ("SYSU-MM01", "cam1/ .. cam6/, exp/"),
    "llcm": ("LLCM", "idx/, vis/, nir/, test_vis/, test_nir/"),
    "casia_nir_vis": ("NIR-VIS-2.0", "s1/ .. s4/, protocols/"),
}
FROM_SCRATCH = "none"  # model.pretrained: random init, said explicitly.
TORCHVISION_RESNET50 = ("resnet50-0676ba61.pth (torchvision ResNet50_Weights.IMAGENET1K_V1, "
                        "https://download.pytorch.org/models/resnet50-0676ba61.pth)")

# Fields (dotted names or section prefixes ending in ".") that never change the trained function or the batch stream.
FREE_FIELDS = (
    "name",
    "evals.", "checkpoint.", "logging.", "visualize.", "mesh.",
    "input.eval_batch_size", "input.prefetch",
    "data.root", "data.data_dir",  # where the same data set lives (a moved or prepared copy).
    "model.require_pretrained",  # only guards the start of a fresh run.
)

# Fields an evaluation of a trained run must share with it: they define the network function (its shapes and its
# parameter-free parts: anm_keep_original, spectral_transform, bn_momentum, dtype, ...), the input size, the number of
# classes (the training ids) or which test images are scored. model.pretrained and model.require_pretrained (the init
# only) are not among them.
EVALUATION_FIELDS = (
    "dataset", "model.", "input.height", "input.width",
    "data.trial", "data.fold", "data.num_val_ids", "data.modality_folder_suffix", "synthetic.",
)
_EVALUATION_EXCEPTIONS = ("model.pretrained", "model.require_pretrained")


def _matches(key: str, patterns: Sequence[str]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def field_role(key: str) -> str:
  """"free" or "trained" for a dotted config field name such as "model.width" (see the module docstring)."""
  return "free" if _matches(key, FREE_FIELDS) else "trained"


def blocks_evaluation(key: str) -> bool:
  """Whether evaluating a trained run with another value of field `key` would score another model or other data."""
  return _matches(key, EVALUATION_FIELDS) and key not in _EVALUATION_EXCEPTIONS


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

  @property
  def blocks_evaluation(self) -> bool:
    return blocks_evaluation(self.key)

  def __str__(self) -> str:
    return f"{self.key}: {json.dumps(self.old)} -> {json.dumps(self.new)}"


MISSING = "<absent>"  # the value `diff` gives a field that one config lacks.


def _comparable(key: str, value: Any) -> Any:
  """The value diff compares: model.pretrained "" (not given) and "none" are the same init (random)."""
  if key == "model.pretrained" and isinstance(value, str) and value.strip().lower() in ("", FROM_SCRATCH):
    return FROM_SCRATCH
  return value


def diff(old: Any, new: Any) -> list[FieldChange]:
  """The fields whose values differ between two configs (ConfigDicts or dicts), sorted by name.

  A field present in only one of them counts as a difference (its other value is "<absent>").
  """
  a, b = flatten(old), flatten(new)
  return [FieldChange(k, a.get(k, MISSING), b.get(k, MISSING), field_role(k))
          for k in sorted(set(a) | set(b))
          if _comparable(k, a.get(k, MISSING)) != _comparable(k, b.get(k, MISSING))]


def _tuples(obj: Any) -> Any:
  """JSON lists back to tuples (config.json stores the config's tuples as lists)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


# Fields added after runs were written without them, whose behaviour before was not today's default: a stored
# config lacking one gets this value (what those runs did), not the default.
# The reference reading of FDNM's numerics (the paper's formulas as the public PyTorch code computes them): ANM's
# one BatchNorm called per branch, exact phases, each spectrum bin on its own, L_cnm on the raw pooled original.
# The defaults differ (configs/default.py says why); these fields select the reference again.
REFERENCE_READING = {"anm_bn": "reference", "anm_inorm_stats": "instance", "phase_guard": "exact",
                     "conjugate_pairs": False, "phase_cut": "arctan2", "cnm_original": "raw"}

LEGACY_VALUES = {
    ("input", "resize"): "tf_bilinear",  # the only resize before config.input.resize existed.
    # Before these fields existed the model was the reference reading (issue 19).
    **{("model", field): value for field, value in REFERENCE_READING.items()},
}


def _merged(defaults: dict, saved: dict) -> dict:
  """`saved` over `defaults`, section by section: fields a newer fdnm-jax added keep their defaults."""
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
  return out


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _join(workdir: str, name: str) -> str:
  if _is_remote(workdir):
    return str(workdir).rstrip("/") + "/" + name
  return os.path.join(os.path.abspath(workdir), name)


def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top  (object stores only)
  return epath.Path(path)


def _exists(path: str) -> bool:
  return _epath(path).exists() if _is_remote(path) else os.path.isfile(path)


def _read_text(path: str) -> str:
  if _is_remote(path):
    return _epath(path).read_text()
  with open(path) as f:
    return f.read()


def config_path(workdir: str) -> str:
  """`<workdir>/config.json`."""
  return _join(workdir, CONFIG_FILE)


def history_path(workdir: str) -> str:
  """`<workdir>/config_history.jsonl`: the segments recorded by allowed config changes, one JSON object a line."""
  return _join(workdir, HISTORY_FILE)


def _defaults() -> dict:
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config().to_dict()


def known_fields() -> list[str]:
  """Every dotted field name of configs/default.py (e.g. "model.width"), sorted."""
  return sorted(flatten(_defaults()))


def _from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A stored config (a config.json dict) over today's defaults; a field of LEGACY_VALUES that the stored config's
  section lacks gets the value such runs had, not today's default."""
  saved = _tuples(saved)
  merged = _merged(_defaults(), saved)
  for (section, field), value in LEGACY_VALUES.items():
    if section in saved and field not in saved[section]:
      merged[section][field] = value
  return ml_collections.ConfigDict(merged)


def _read_json(path: str, what: str) -> Any:
  try:
    return json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path} ({what}) is not valid JSON ({e}): restore it from a backup, or use a new "
                       "--workdir.") from None


def load_stored(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config a workdir was first trained with (`<workdir>/config.json`) over `configs/default.py`, so that a run
  written by an older version gets the defaults of the fields it lacks; None when the workdir has no config.json."""
  path = config_path(workdir)
  if not _exists(path):
    return None
  return _from_saved(_read_json(path, "the run's config"))


def read_history(workdir: str) -> list[dict]:
  """The recorded segments of `<workdir>/config_history.jsonl`, oldest first ([] when there is none).

  Each: {"step": the first step trained under it (the restored step), "time": ISO 8601 UTC, "changes":
  [{"field", "old", "new"}], "config": the whole config from then on}.
  """
  path = history_path(workdir)
  if not _exists(path):
    return []
  out = []
  for number, line in enumerate(_read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise WorkdirError(f"{path}, line {number} is not valid JSON ({e}): restore the file, or use a new "
                         "--workdir.") from None
  return out


def load_effective(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config the run's latest segment trains with: the last `config_history.jsonl` record's config, else
  config.json (both over the defaults); None when the workdir has no config.json. Later commands compare with it."""
  stored = load_stored(workdir)
  if stored is None:
    return None
  history = read_history(workdir)
  return _from_saved(history[-1]["config"]) if history else stored


def canonical(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` as config.json stores it: model.pretrained "" (random init) written as "none"."""
  out = ml_collections.ConfigDict(config.to_dict())
  model = out.get("model")
  if model is not None and isinstance(model.get("pretrained"), str) and not model.pretrained.strip():
    model.pretrained = FROM_SCRATCH
  return out


def to_json(config: ml_collections.ConfigDict) -> str:
  """config.json's text: the canonical config, indented, keys sorted."""
  return canonical(config).to_json_best_effort(indent=2, sort_keys=True)


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: readers see the old file or the new one
  (an object-store URL, gs://..., is written whole: its objects are atomic)."""
  if _is_remote(path):
    _epath(path).write_text(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_stored(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json` (atomically). Training calls it once, on a fresh run."""
  write_atomically(config_path(workdir), to_json(config))


# ------------------------------------------------------------------------------------------------ the contract


@dataclasses.dataclass(frozen=True)
class Contract:
  """What `check_contract` found for one command on one workdir.

  Attributes:
    fresh: the workdir holds no config.json (a new run: the config becomes the contract).
    stored: the latest segment's config (`load_effective`), None when fresh.
    changes: every field that differs from `stored` (free ones included), sorted by name.
    accepted: the changes that need recording as a new segment (trained fields, allowed by the caller).
    config: the config the command should use (see `check_contract`).
  """
  fresh: bool
  stored: Optional[ml_collections.ConfigDict]
  changes: tuple
  accepted: tuple
  config: ml_collections.ConfigDict

  def describe_free(self) -> str:
    """The free-field changes as one line ("" when there are none), for the log."""
    free = [str(c) for c in self.changes if c not in self.accepted and c.role == "free"]
    return "; ".join(free)


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The largest step folder of `<workdir>/checkpoints` (names only, nothing is read); None when there is none."""
  folder = _join(workdir, "checkpoints")
  if _is_remote(folder):
    path = _epath(folder)
    names = [p.name for p in path.iterdir() if p.is_dir()] if path.exists() else []
  else:
    names = ([d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
             if os.path.isdir(folder) else [])
  steps = [int(d) for d in names if d.isdigit()]
  return max(steps) if steps else None


def _overlay(base: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
             keep: Callable[[str], bool]) -> ml_collections.ConfigDict:
  """`base` with the values of `given` for every field where `keep(field)`."""
  out = base.to_dict()
  for key, value in flatten(given).items():
    if not keep(key):
      continue
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(_tuples(out))


def check_contract(workdir: str, config: ml_collections.ConfigDict, purpose: str = "resume",
                   allow_change: bool = False) -> Contract:
  """Compares `config` with the workdir's stored config (the latest segment); reads only, writes nothing.

  Args:
    workdir: the run's folder (it need not exist: then the run is fresh).
    config: the config of this command.
    purpose: "resume" (training on the workdir: a fresh run or a resume) or "evaluate" (--mode=eval, extract,
      visualize with a given config).
    allow_change: "resume" only: accept differing trained fields (they become a new segment of the run's history,
      `record_segment`) instead of stopping.
  Returns:
    A `Contract`. `config` is, for "resume", the given config; for "evaluate", the stored config with the given
    config's free fields (evals.*, data.root, data.data_dir, the eval batch size, mesh.*, ...): trained fields
    that do not block evaluation (optim.*, loss.*, model.pretrained, ...) keep the run's values, so a report
    describes the run that was trained.
  Raises:
    WorkdirError ("resume") / ConfigError ("evaluate"): differing fields that the purpose does not allow; the
      message lists every one (old -> new) and the ways to proceed.
  """
  if purpose not in ("resume", "evaluate"):
    raise ValueError(f"purpose={purpose!r}: use 'resume' or 'evaluate'")
  stored = load_effective(workdir)
  if stored is None:
    return Contract(fresh=True, stored=None, changes=(), accepted=(), config=config)
  changes = tuple(diff(stored, config))
  where = config_path(workdir) + (f" and {history_path(workdir)}" if read_history(workdir) else "")
  if purpose == "evaluate":
    blocking = [c for c in changes if c.blocks_evaluation]
    if blocking:
      raise ConfigError(
          f"--config differs from the run's {where} in {len(blocking)} field(s) that fix the evaluated model or "
          "test set: " + "; ".join(f"{c.key} (trained: {json.dumps(c.old)}, --config: {json.dumps(c.new)})"
                                   for c in blocking)
          + ". Drop --config to evaluate with the run's own config, or pass a --config that differs only in "
          "evaluation fields (evals.*, input.eval_batch_size, data.root, data.data_dir, mesh.*).")
    return Contract(fresh=False, stored=stored, changes=changes, accepted=(),
                    config=_overlay(stored, config, lambda k: field_role(k) == "free"))
  trained = tuple(c for c in changes if c.role == "trained")
  if trained and not allow_change:
    step = latest_checkpoint_step(workdir)
    at = f"its latest checkpoint, step {step}" if step is not None else "step 0 (it has no checkpoint yet)"
    raise WorkdirError(
        f"workdir {workdir} holds a run whose config ({where}) differs in {len(trained)} field(s) "
        f"that change the trained model or its batches: {'; '.join(str(c) for c in trained)}. Resuming would mix "
        "two runs. Either train in a new --workdir, or repeat the run's own settings, or pass --allow_config_change "
        f"to continue this run under the new values from {at} (recorded in {history_path(workdir)}; config.json "
        "keeps the original).")
  return Contract(fresh=False, stored=stored, changes=changes, accepted=trained, config=config)


def record_segment(workdir: str, contract: Contract, step: int, now: Optional[datetime.datetime] = None) -> dict:
  """Appends the contract's accepted changes to `<workdir>/config_history.jsonl` as the segment starting at `step`
  (the step training resumes from). Call it once the run is restored, just before training under the new config.

  Returns:
    The record written: {"step", "time", "changes": [{"field", "old", "new"}], "config"}.
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  record = {"step": int(step), "time": now.isoformat(timespec="seconds"),
            "changes": [{"field": c.key, "old": c.old, "new": c.new} for c in contract.accepted],
            "config": json.loads(to_json(contract.config))}
  path = history_path(workdir)
  previous = _read_text(path) if _exists(path) else ""
  if previous and not previous.endswith("\n"):
    previous += "\n"
  write_atomically(path, previous + json.dumps(record, sort_keys=True) + "\n")
  return record


# ------------------------------------------------------------------------------------------------ validation


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _type_name(default: Any) -> str:
  if isinstance(default, bool):
    return "true or false"
  if isinstance(default, int):
    return "an integer"
  if isinstance(default, float):
    return "a finite number"
  if isinstance(default, str):
    return "a string"
  return "a tuple"


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return _is_int(value)
  if isinstance(default, float):
    return _is_number(value)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _show(value: Any) -> str:
  return json.dumps(_plain(value)) if isinstance(value, (list, tuple, str, bool, type(None))) else repr(value)


# Range rules: field -> (predicate on a value of the right type, what it should be and why when the reason is not
# obvious). Every field is also type-checked against its default in configs/default.py.
def _int_at_least(lo: int) -> Callable[[Any], bool]:
  return lambda v: v >= lo


def _in_unit(lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
  return lambda v: (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)


def _ints(values: Any, lo: int, hi: Optional[int] = None) -> bool:
  return all(_is_int(x) and x >= lo and (hi is None or x <= hi) for x in values)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v)),
             "a non-empty file name of letters, digits, '.', '_' or '-' (it names results/<name>.json)"),
    "dataset": (lambda v: v in DATASETS, f"a known data set, one of {', '.join(DATASETS)}"),
    "seed": (_int_at_least(0), "an integer >= 0 (the sampler's and the augmentation's seeds)"),
    "data.trial": (lambda v: 1 <= v <= 10, "a RegDB split in 1..10"),
    "data.fold": (lambda v: 1 <= v <= 10, "a CASIA NIR-VIS 2.0 fold in 1..10"),
    "data.num_val_ids": (_int_at_least(0), "an integer >= 0 (0 = no validation split)"),
    "synthetic.num_train_ids": (_int_at_least(1), "an integer >= 1"),
    "synthetic.num_test_ids": (_int_at_least(1), "an integer >= 1"),
    "synthetic.images_per_id": (_int_at_least(1), "an integer >= 1"),
    "synthetic.num_cameras": (_int_at_least(1), "an integer >= 1"),
    "synthetic.height": (_int_at_least(16), "an integer >= 16 (the generator draws at least 16 x 8 pixels)"),
    "synthetic.width": (_int_at_least(8), "an integer >= 8 (the generator draws at least 16 x 8 pixels)"),
    "synthetic.seed": (_int_at_least(0), "an integer >= 0"),
    "input.height": (_int_at_least(1), "an integer >= 1 (pixels)"),
    "input.width": (_int_at_least(1), "an integer >= 1 (pixels)"),
    "input.num_ids_per_batch": (_int_at_least(2), "an integer >= 2 (the batch-hard triplet and L_cnm need another "
                                "identity in the batch as a negative)"),
    "input.num_instances": (_int_at_least(1), "an integer >= 1 (images per identity and modality)"),
    "input.pad": (_int_at_least(0), "an integer >= 0 (pixels; 0 = no pad-and-crop)"),
    "input.random_grayscale": (_in_unit(), "a probability in [0, 1]"),
    "input.random_erasing": (_in_unit(), "a probability in [0, 1]"),
    "input.erasing_area": (lambda v: len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
                           "two fractions (low, high) with 0 < low <= high <= 1"),
    "input.erasing_min_aspect": (_in_unit(lo_open=True), "a number in (0, 1] (the maximum aspect is its inverse)"),
    "input.eval_batch_size": (_int_at_least(1), "an integer >= 1"),
    "input.prefetch": (_int_at_least(0), "an integer >= 0 (batches; 0 = 1)"),
    "model.stage_sizes": (lambda v: len(v) >= 1 and _ints(v, 1), "a non-empty tuple of integers >= 1, e.g. "
                          "(3, 4, 6, 3) for ResNet-50"),
    "model.width": (_int_at_least(1), "an integer >= 1 (64 = ResNet-50)"),
    "model.last_stride": (lambda v: v in (1, 2), "1 or 2"),
    "model.dtype": (lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    "model.agp_groups": (_int_at_least(1), "an integer >= 1"),
    "model.num_parts": (_int_at_least(0), "an integer >= 0 (0 = global features only)"),
    "model.bn_momentum": (_in_unit(hi_open=True), "a decay in [0, 1) (0.9 = PyTorch's momentum 0.1)"),
    "model.spectral_transform": (lambda v: v in ("fft", "dft_matmul"), "fft or dft_matmul"),
    "model.anm_bn": (lambda v: v in ("reference", "joint", "per_branch", "none"),
                     "reference, joint, per_branch or none"),
    "model.anm_inorm_stats": (lambda v: v in ("instance", "exclude_dc"), "instance or exclude_dc"),
    "model.phase_guard": (lambda v: v in ("exact", "reference", "floor", "soft"), "exact, reference, floor or soft"),
    "model.phase_floor": (lambda v: 0 <= v < 1, "a fraction of the channel's RMS amplitude in [0, 1)"),
    "model.phase_soft_eps": (lambda v: v >= 0, "a fraction of the channel's RMS amplitude, >= 0"),
    "model.phase_cut": (lambda v: v in ("principal", "arctan2"), "principal or arctan2"),
    "model.cnm_original": (lambda v: v in ("raw", "batch_standardized"), "raw or batch_standardized"),
    "loss.id_weight": (lambda v: v >= 0, "a number >= 0"),
    "loss.label_smoothing": (_in_unit(hi_open=True), "a number in [0, 1)"),
    "loss.triplet": (lambda v: v in ("hard", "wrt"), "hard or wrt"),
    "loss.triplet_weight": (lambda v: v >= 0, "a number >= 0"),
    "loss.triplet_margin": (lambda v: v >= 0, "a number >= 0"),
    "loss.cnm_weight": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "loss.cnm_margin": (lambda v: v >= 0, "a number >= 0"),
    "loss.ortho_weight": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "optim.base_lr": (lambda v: v >= 0, "a learning rate >= 0 (a negative one climbs the loss)"),
    "optim.head_lr": (lambda v: v >= 0, "a learning rate >= 0 (a negative one climbs the loss)"),
    "optim.momentum": (_in_unit(hi_open=True), "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "schedule.num_epochs": (_int_at_least(1), "an integer >= 1"),
    "schedule.steps_per_epoch": (_int_at_least(0), "an integer >= 0 (0 = derived from the data set)"),
    "schedule.warmup_epochs": (_int_at_least(0), "an integer >= 0 (0 = no warm-up)"),
    "schedule.decay_epochs": (lambda v: _ints(v, 0) and list(v) == sorted(set(v)),
                              "increasing integers >= 0 (epochs), e.g. (20, 80)"),
    "schedule.decay_factor": (_in_unit(lo_open=True), "a number in (0, 1]"),
    "evals.every_steps": (_int_at_least(0), "an integer >= 0 (0 = only at the end)"),
    "evals.sysu_gallery_sampling": (lambda v: v in ("seeded", "official"), "seeded or official"),
    "evals.face_folds": (lambda v: _ints(v, 1, 10) and len(set(v)) == len(v), "distinct folds in 1..10 (() = "
                         "config.data.fold)"),
    "evals.max_rank": (_int_at_least(1), "an integer >= 1"),
    "evals.query_chunk": (_int_at_least(1), "an integer >= 1"),
    "evals.rerank_k1": (_int_at_least(1), "an integer >= 1"),
    "evals.rerank_k2": (_int_at_least(1), "an integer >= 1"),
    "evals.rerank_lambda": (_in_unit(), "a weight in [0, 1]"),
    "evals.select_metric": (lambda v: v in ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "vr_far_1",
                                            "vr_far_0_1"),
                            "a metric of the selection split: mAP, mINP, rank1/5/10/20 (faces: rank1, vr_far_1, "
                            "vr_far_0_1)"),
    "evals.embedding": (lambda v: v in ("spec", "deen"), "spec or deen"),
    "evals.recalibrate_bn_batches": (_int_at_least(0), "an integer >= 0 (0 = off)"),
    "evals.health_max_mean_cosine": (_in_unit(lo_open=True), "a mean cosine in (0, 1]"),
    "checkpoint.every_steps": (_int_at_least(0), "an integer >= 0 (0 = only at the end)"),
    "checkpoint.keep": (_int_at_least(1), "an integer >= 1"),
    "logging.every_steps": (_int_at_least(1), "an integer >= 1"),
    "visualize.top_k": (_int_at_least(1), "an integer >= 1"),
    "visualize.num_bins": (_int_at_least(1), "an integer >= 1"),
    "visualize.tsne_max_ids": (_int_at_least(1), "an integer >= 1"),
    "visualize.tsne_perplexity": (lambda v: v > 0, "a number > 0"),
    "visualize.seed": (_int_at_least(0), "an integer >= 0"),
    "mesh.data": (lambda v: v == -1 or v >= 1, "-1 (the devices not on other axes) or an integer >= 1"),
    "mesh.fsdp": (_int_at_least(1), "an integer >= 1"),
    "mesh.fsdp_min_size": (_int_at_least(0), "an integer >= 0 (elements)"),
}


def _final_map_height(height: int, num_stages: int, last_stride: int) -> int:
  """Rows of the last stage's map: the stem halves twice (conv 7x7/2, max-pool 3x3/2), each later stage with
  stride 2 halves (rounding up, SAME padding), the last stage by `last_stride` (`models.resnet.stage_strides`)."""
  strides = [1] + [2] * (num_stages - 1)
  if num_stages > 1:
    strides[-1] = last_stride
  for s in [2, 2] + strides:
    height = -(-height // s)
  return height


def _cross_field_problems(c: ml_collections.ConfigDict, fresh: bool) -> list[str]:
  """Problems that involve more than one field or the data set (each field already has the right type)."""
  out = []
  m = c.model
  num_stages = len(m.stage_sizes)
  bad = [s for s in m.agp_stages if not (_is_int(s) and 1 <= s <= num_stages)]
  if not num_stages:
    pass  # model.stage_sizes is reported itself.
  elif bad or len(set(m.agp_stages)) != len(m.agp_stages):
    out.append(f"model.agp_stages={_show(m.agp_stages)}: expected distinct stages in 1..{num_stages} (the "
               f"{num_stages} stages of model.stage_sizes; () = no AGP)")
  elif m.width >= 1 and m.agp_groups >= 1:
    for s in m.agp_stages:
      channels = m.width * 2 ** (s - 1) * 4
      if channels % m.agp_groups:
        out.append(f"model.agp_groups={m.agp_groups}: does not divide the {channels} channels after stage {s} "
                   f"(model.width={m.width}); use a divisor such as 4")
        break
  if not num_stages:
    pass
  elif not (_is_int(m.anm_stage) and 0 <= m.anm_stage <= num_stages):
    out.append(f"model.anm_stage={_show(m.anm_stage)}: expected 0 (no ANM) or a stage in 1..{num_stages}")
  elif m.anm_keep_original and m.anm_stage == 0:
    out.append("model.anm_keep_original=true: needs ANM (model.anm_stage > 0)")
  if num_stages and m.num_parts > 0 and c.input.height >= 1 and m.last_stride in (1, 2):
    rows = _final_map_height(c.input.height, num_stages, m.last_stride)
    if m.num_parts > rows:
      out.append(f"model.num_parts={m.num_parts}: more stripes than the {rows} rows of the last map (input.height="
                 f"{c.input.height}, last_stride={m.last_stride})")
  if c.loss.id_weight == c.loss.triplet_weight == c.loss.cnm_weight == 0:
    out.append("loss.id_weight, loss.triplet_weight, loss.cnm_weight: all 0, nothing to train; set at least one > 0")
  if c.optim.base_lr == c.optim.head_lr == 0:
    out.append("optim.base_lr, optim.head_lr: both 0, nothing would train; set at least one > 0")
  if c.dataset in DOWNLOADED and not c.data.root and not c.data.data_dir:
    folder, layout = DOWNLOADED[c.dataset]
    out.append(f"data.root: empty; config.dataset={c.dataset!r} needs the downloaded {folder} folder: pass "
               f"--config.data.root=/path/to/{folder} (it holds {layout}), or a prepared folder with "
               "--config.data.data_dir")
  if c.dataset == "casia_nir_vis" and c.evals.rerank:
    out.append("evals.rerank=true: re-ranking is not part of the face protocol (casia_nir_vis); set it false")
  if c.dataset != "casia_nir_vis" and tuple(c.evals.face_folds):
    out.append(f"evals.face_folds={_show(c.evals.face_folds)}: only for dataset casia_nir_vis; leave it ()")
  if c.evals.rerank and c.evals.rerank_k2 > c.evals.rerank_k1:
    out.append(f"evals.rerank_k2={c.evals.rerank_k2}: must not exceed evals.rerank_k1={c.evals.rerank_k1} (the "
               "expansion averages neighbours within the k1 neighbourhood)")
  if fresh:
    out += _pretrained_problems(m)
  return out


def _pretrained_problems(m: ml_collections.ConfigDict) -> list[str]:
  """A fresh run's init: weights required by the data-set recipe, and a given file that exists with a known type."""
  value = m.pretrained.strip()
  if not value and m.require_pretrained:
    return [f"model.pretrained: not given; this recipe starts from ImageNet weights (every reference "
            f"implementation does). Download torchvision's {TORCHVISION_RESNET50}, convert it once with `python -m "
            "fdnm_jax.convert --src resnet50-0676ba61.pth --dst resnet50.npz` and pass "
            "--config.model.pretrained=/path/resnet50.npz; or pass --config.model.pretrained=none to train from "
            "scratch (reports then say so)"]
  if value and value.lower() != FROM_SCRATCH:
    ext = os.path.splitext(value)[1].lower()
    if ext not in (".npz", ".safetensors", ".pth", ".pt", ".bin"):
      return [f"model.pretrained={_show(value)}: unknown file type {ext or '(none)'!r}; expected .npz, .safetensors, "
              ".pth or .pt (convert with python -m fdnm_jax.convert), or none"]
    if not os.path.isfile(value):
      return [f"model.pretrained={_show(value)}: no such file; pass the converted weights' path, or none"]
  return []


def problems(config: ml_collections.ConfigDict, fresh: bool = True) -> list[str]:
  """Every problem of `config`, one "field=value: expected ..." line each ([] = valid).

  Args:
    config: a whole config (built from `configs.default.get_config()`).
    fresh: the config starts a new run (no config.json in the workdir): the init is checked too (model.pretrained
      required by the recipe, and the file must exist); a resume restores its checkpoint instead.
  """
  defaults = flatten(_defaults())
  given = flatten(config)
  out = []
  for key in sorted(set(given) - set(defaults)):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    out.append(f"{key}: not a field of fdnm-jax" + (f" (did you mean {close[0]}?)" if close else "")
               + "; configs/default.py lists every field")
  missing = sorted(set(defaults) - set(given))
  for key in missing:
    out.append(f"{key}: missing; build configs from configs.default.get_config()")
  typed = not missing
  for key in sorted(set(given) & set(defaults)):
    value, default = given[key], defaults[key]
    if not _type_ok(value, default):
      out.append(f"{key}={_show(value)}: expected {_type_name(default)}")
      typed = False
      continue
    rule = _RULES.get(key)
    if rule is not None:
      check, expected = rule
      try:
        ok = check(value)
      except TypeError:  # elements of the wrong type inside a tuple
        ok = False
      if not ok:
        out.append(f"{key}={_show(value)}: expected {expected}")
  try:  # the cross-field checks read the fields as their defaults' types say; each guards its own ranges.
    out += _cross_field_problems(config, fresh)
  except (TypeError, ValueError, AttributeError):
    if typed:
      raise
  return out


def validate(config: ml_collections.ConfigDict, fresh: bool = True) -> None:
  """Raises ConfigError naming every bad field of `config` (see `problems`); returns None when it is valid."""
  found = problems(config, fresh)
  if found:
    raise ConfigError(f"{len(found)} config problem{'s' if len(found) > 1 else ''}: " + " | ".join(found)
                      + ". Fix with --config.<field>=<value> (configs/default.py documents every field).")


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """The checks that need the device count: the mesh sizes and the split of the batches over its shards.

  Raises:
    ConfigError: naming the fields (config.mesh.*, config.input.num_ids_per_batch / num_instances).
  """
  data, fsdp = config.mesh.data, config.mesh.fsdp
  found = []
  if data == -1:
    if num_devices % fsdp:
      found.append(f"mesh.fsdp={fsdp}: does not divide the {num_devices} available devices")
    shards = num_devices
  else:
    if data * fsdp != num_devices:
      found.append(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are available "
                   "(mesh.data=-1 uses the rest)")
    shards = data * fsdp
  pk = config.input.num_ids_per_batch * config.input.num_instances
  if not found and pk % shards:
    found.append(f"input.num_ids_per_batch x input.num_instances = {pk} images per modality do not split over the "
                 f"{shards} batch shards of the mesh")
  if found:
    raise ConfigError(" | ".join(found) + ". Change the fields, or the number of devices.")
