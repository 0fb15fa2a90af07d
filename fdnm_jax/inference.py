"""A trained workdir's model for eval, extract and visualize (its config, its checkpoint), and feature extraction.

Loading (`resolve_config`, `load_model`) is the one path of `--mode=eval|extract|visualize`: the workdir's
config.json (a --config may change evaluation fields only), then the checkpoint's params and BN statistics restored
from its own metadata (`checkpoints.restore_variables`; no data set, no optimizer), checked against the model of
the config first.

Feature extraction embeds any images of one modality:

  python main.py --mode=extract --workdir=runs/synthetic --images=/data/my_crops --modality=infrared --out=feats/
  python -m fdnm_jax.inference --workdir=runs/synthetic --images=list.txt --modality=visible --out=feats/

`--images` is a folder (searched recursively for IMAGE_EXTENSIONS, sorted by path) or a text file with one image
path per line (relative paths are relative to the list file's folder; blank lines and lines starting with # are
skipped). The output folder receives `features.npy` (float32 [N, E], row i = image i) and `index.tsv` (header
`row path modality [label camera]`, one line per row).

The embedding is the evaluator's: the same eval transform (`pipeline.eval_batches`), the same jitted
`evaluator.make_embed_fn` with the batch sharded over the mesh, the same batch size and test-time flip
(config.evals.test_flip), so a test image's features equal the evaluator's embedding of it bit for bit.
"""

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fdnm_jax import checkpoints, precise_bn, run_config, sharding
from fdnm_jax.errors import CheckpointError, DataError, FlagError, MissingFileError
from fdnm_jax.evaluation import evaluator
from fdnm_jax.models.fdnm import fdnm_from_config
from fdnm_jax.progress import Progress
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")  # what `pipeline.decode` reads.
MODALITY_IDS = {"visible": VISIBLE, "infrared": INFRARED}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The config an evaluation of a workdir runs with, and how it came about (reports list both lists)."""
  config: ml_collections.ConfigDict
  overridden: tuple  # run_config.FieldChange: free fields taken from the given --config.
  ignored: tuple  # run_config.FieldChange: training-only fields of the given --config that differ (not used).
  source: str  # "<workdir>/config.json", "<workdir>/config.json + --config" or "--config (no config.json)".

  def describe(self) -> list[str]:
    """Lines for a report: where the config came from, what was overridden, what was ignored."""
    lines = [f"config: {self.source}"]
    lines += [f"overridden for this evaluation: {c}" for c in self.overridden]
    lines += [f"ignored (training only): {c}" for c in self.ignored]
    return lines


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir trains with now (`run_config.load_effective`: `<workdir>/config.json`, or the latest
  segment of its config_history.jsonl after an allowed change), over `configs/default.py` so that a run written by
  an older version gets defaults for the fields it lacks.

  Raises:
    MissingFileError: the workdir has no config.json.
  """
  config = run_config.load_effective(workdir)
  if config is None:
    raise MissingFileError(f"{run_config.config_path(workdir)} not found: --workdir must be a training run's folder "
                           "(training writes config.json there), or pass --config with the run's config.")
  return config


def resolve_config(workdir: str, given: Optional[ml_collections.ConfigDict] = None) -> EvalConfig:
  """The config to evaluate a workdir with (`--mode=eval|extract|visualize`).

  Without `given`: the workdir's config (`load_config`). With `given` (a --config): the workdir's contract for
  evaluation (`run_config.check_contract(..., "evaluate")`): a field that fixes the evaluated model or test set
  (`run_config.blocks_evaluation`: model.*, the input size, the data set and split, ...) that differs is an error
  naming the fields; free fields (evals.*, input.eval_batch_size, data.root, ...) are taken from `given`; the other
  trained fields (optimiser, loss, init, ...) keep the run's values and are listed as ignored. A workdir without
  config.json (an older run) uses `given` as it is.

  Raises:
    ConfigError: `given` differs in a field that fixes the evaluated model or test set.
    MissingFileError: no config.json and no `given`.
  """
  path = run_config.config_path(workdir)
  if given is None:
    return EvalConfig(load_config(workdir), (), (), path)
  contract = run_config.check_contract(workdir, given, "evaluate")
  if contract.fresh:
    logging.warning("%s not found: evaluating with --config as given (it cannot be checked against the run).", path)
    return EvalConfig(given, (), (), "--config (the workdir has no config.json)")
  overridden = tuple(c for c in contract.changes if c.role == "free" and c.new != run_config.MISSING)
  ignored = tuple(c for c in contract.changes if c.role == "trained")
  for c in overridden:
    logging.info("Evaluation override of %s: %s", path, c)
  if ignored:
    logging.info("Ignored training-only fields of --config (evaluation uses the checkpoint): %s",
                 ", ".join(str(c) for c in ignored))
  return EvalConfig(contract.config, overridden, ignored, f"{path} + --config")


def expected_variables(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The {"params", "batch_stats"} ShapeDtypeStructs the model of `config` has with `num_classes` identities."""
  model = fdnm_from_config(config.model, num_classes)
  image = jax.ShapeDtypeStruct((1, config.input.height, config.input.width, 3), jnp.float32)
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i, train=False), image, image)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def restore_variables(workdir: str, step: int, config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> tuple[dict, int]:
  """The Flax variables of `<workdir>/checkpoints/<step>` (`checkpoints.restore_variables`: params and BN statistics,
  replicated over `mesh`, no data set needed), checked against the model of `config` first.

  Returns:
    ({"params", "batch_stats"}, num_classes): num_classes = the classifier's output width.
  Raises:
    CheckpointError: the checkpoint cannot be read, or it does not fit the model of `config` (names the fields).
  """
  step_folder = checkpoints.step_path(workdir, step)
  expected = lambda n: expected_variables(config, n)  # noqa: E731
  try:
    return checkpoints.restore_variables(
        step_folder, mesh, expected=expected, fields=_fields_of(step_folder, config),
        fix="Evaluate with the config the checkpoint was trained with (its workdir's config.json, or --config).")
  except checkpoints.UnreadableCheckpointError as e:
    earlier = [s for s in checkpoints.committed_steps(workdir) if s < step]
    raise CheckpointError(f"{e}. Pass --checkpoint=<another step>{f' (e.g. {earlier[-1]})' if earlier else ''}; a "
                          "training run on this workdir moves it aside and resumes from the previous one.") from e


def _fields_of(step_folder: str, config: ml_collections.ConfigDict) -> str:
  """What the checkpoint's params say about its model fields, against the model of `config` (for error messages);
  "" when that cannot be told."""
  try:
    tree = checkpoints.state_metadata(step_folder)
    n = checkpoints.classifier_width(tree)
    return checkpoints.model_field_differences(tree["params"], expected_variables(config, n)["params"])
  except Exception:  # pylint: disable=broad-except  (only a better message is at stake; the restore reports errors)
    return ""


def load_model(workdir: str, checkpoint: Optional[str] = None, config: Optional[ml_collections.ConfigDict] = None,
               mesh: Optional[jax.sharding.Mesh] = None) -> tuple[ml_collections.ConfigDict, Any, dict]:
  """Loads a trained model: (config, model, variables), the one restore path of eval, extract and visualize.

  Args:
    workdir: a training run's folder.
    checkpoint: None (latest), a step number, or a folder `<workdir>/checkpoints/<step>` (`checkpoints.resolve`).
    config: the config to build the model with (already resolved, `resolve_config`); None = `<workdir>/config.json`.
    mesh: the device mesh (default: `config.mesh` over all devices).
  Raises:
    MissingFileError: no config.json, no checkpoint, or the requested one does not exist.
    CheckpointError: the checkpoint cannot be read or does not fit the config's model.
  """
  workdir = os.path.abspath(workdir)
  config = load_config(workdir) if config is None else config
  ckpt_workdir, step = checkpoints.resolve(workdir, checkpoint)
  if step is None:
    raise MissingFileError(f"no checkpoint under {checkpoints.checkpoint_dir(workdir)}: train first (python "
                           "main.py --mode=train with this --workdir) or pass --checkpoint=<step folder>.")
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  model, variables = restore_model(ckpt_workdir, step, config, mesh)
  model, variables, _ = precise_bn.for_evaluation(model, variables, config, mesh, ckpt_workdir, step)  # as evaluated.
  return config, model, variables


def restore_model(workdir: str, step: int, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
  """The model of `config` and the variables of `<workdir>/checkpoints/<step>` as trained (`restore_variables`;
  no BatchNorm recalibration: `precise_bn.for_evaluation` does that)."""
  variables, num_classes = restore_variables(workdir, step, config, mesh)
  logging.info("Loaded %s step %d (%d training identities)", checkpoints.checkpoint_dir(workdir), step, num_classes)
  return fdnm_from_config(config.model, num_classes), variables


def init_variables(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
  """An untrained model of `config` and its random variables (seed config.seed), replicated over `mesh`: what
  `--allow_untrained` evaluates. The classifier has one output (it plays no part in the embedding)."""
  model = fdnm_from_config(config.model, 1)
  image = jnp.zeros((1, config.input.height, config.input.width, 3), jnp.float32)
  init = jax.jit(lambda: model.init(jax.random.key(config.seed), image, image, train=False),
                 out_shardings=sharding.replicated(mesh))
  variables = init()
  return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def embed_set(embed_fn: Any, variables: Any, image_set: ImageSet, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh, name: str = "embed") -> np.ndarray:
  """`evaluator.embed_image_set` of `image_set` (the same batches, hence identical embeddings) with a progress
  line named `name`, flip per config.evals.test_flip.

  Returns:
    float32 [len(image_set), E].
  Raises:
    ValueError: `image_set` is empty.
  """
  if not len(image_set):
    raise DataError(f"{name}: no images to embed.")
  progress = Progress(name, total=len(image_set), unit="img")
  embeddings = evaluator.embed_image_set(embed_fn, variables, image_set, config.input, mesh,
                                         flip=config.evals.test_flip, progress=progress)
  progress.done()
  return embeddings


def embed_paths(model: Any, variables: Any, paths: Sequence[str], modality: str, config: ml_collections.ConfigDict,
                mesh: Optional[jax.sharding.Mesh] = None) -> np.ndarray:
  """Embeds image files of one modality with the evaluator's transform and jitted embedding.

  Args:
    model, variables: from `load_model`.
    paths: image files (any size: resized to config.input.height x width).
    modality: "visible" or "infrared" (which stem embeds them).
    config: the run's config (input size, eval batch size, evals.test_flip).
  Returns:
    float32 [len(paths), E], row i = paths[i].
  """
  if modality not in MODALITY_IDS:
    raise FlagError(f"--modality={modality!r}: use visible or infrared.")
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  image_set = ImageSet(tuple(os.path.abspath(p) for p in paths), np.full(len(paths), -1), np.zeros(len(paths)),
                       MODALITY_IDS[modality])
  embed_fn = evaluator.make_embed_fn(model, mesh, modality, config.evals.embedding)
  return embed_set(embed_fn, variables, image_set, config, mesh, name=f"embed {modality}")


def list_images(images: str) -> list[str]:
  """Absolute image paths from a folder (recursive, IMAGE_EXTENSIONS, sorted) or a text list (one path a line).

  Raises:
    FileNotFoundError: `images` or a listed file does not exist; ValueError: no images found.
  """
  images = os.path.abspath(images)
  if os.path.isdir(images):
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(images) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
      raise DataError(f"--images={images}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in that folder or below.")
    return paths
  if not os.path.isfile(images):
    raise MissingFileError(f"--images={images}: no such folder or list file.")
  base = os.path.dirname(images)
  with open(images) as f:
    lines = [line.strip() for line in f]
  paths = [os.path.normpath(os.path.join(base, line)) for line in lines if line and not line.startswith("#")]
  if not paths:
    raise DataError(f"--images={images}: the list file names no images (one path per line).")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise MissingFileError(f"--images={images}: {len(missing)} listed file(s) not found, first {missing[0]}; "
                           "paths are relative to the list file's folder.")
  return paths


def write_features(out: str, features: np.ndarray, paths: Sequence[str], modality: str,
                   labels: Optional[Sequence[int]] = None, cameras: Optional[Sequence[int]] = None) -> dict:
  """Writes `<out>/features.npy` (float32 [N, E]) and `<out>/index.tsv`; returns {"features", "index"} paths."""
  if len(features) != len(paths):
    raise ValueError(f"{len(features)} feature rows for {len(paths)} paths")
  os.makedirs(out, exist_ok=True)
  files = {"features": os.path.join(out, "features.npy"), "index": os.path.join(out, "index.tsv")}
  np.save(files["features"], np.asarray(features, np.float32))
  known = labels is not None and cameras is not None
  with open(files["index"], "w") as f:
    f.write("row\tpath\tmodality" + ("\tlabel\tcamera" if known else "") + "\n")
    for i, p in enumerate(paths):
      extra = f"\t{int(labels[i])}\t{int(cameras[i])}" if known else ""
      f.write(f"{i}\t{p}\t{modality}{extra}\n")
  return files


def read_index(path: str) -> list[dict]:
  """Rows of an index.tsv as dicts (row as int, label/camera as int when present)."""
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]
  for r in rows:
    for k in ("row", "label", "camera"):
      if k in r:
        r[k] = int(r[k])
  return rows


def extract(workdir: str, images: str, modality: str, out: str, checkpoint: Optional[str] = None,
            config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Embeds the images of `images` (folder or list) with the workdir's model and writes features + index.

  Args:
    workdir: a training run's folder; checkpoint: None (latest), a step, or a step folder.
    images: a folder (recursive) or a text list of image paths; modality: "visible" | "infrared".
    out: output folder (created); config: a --config (`resolve_config`: compared with `<workdir>/config.json`,
      only evaluation fields may differ); None = `<workdir>/config.json`.
  Returns:
    {"features": path, "index": path, "num_images": N, "dim": E}.
  """
  if modality not in MODALITY_IDS:
    raise FlagError(f"--modality={modality!r}: use visible or infrared.")
  paths = list_images(images)
  config = resolve_config(workdir, config).config
  config, model, variables = load_model(workdir, checkpoint, config)
  mesh = sharding.make_mesh(config.mesh)
  features = embed_paths(model, variables, paths, modality, config, mesh)
  result = {"num_images": int(features.shape[0]), "dim": int(features.shape[1])}
  if jax.process_index() == 0:
    result.update(write_features(out, features, paths, modality))
    logging.info("Wrote %d x %d features to %s", features.shape[0], features.shape[1], result["features"])
  return result


def _cli(argv: Sequence[str]) -> None:
  del argv
  flags = _FLAGS
  extract(flags.workdir, flags.images, flags.modality, flags.out, flags.checkpoint)


if __name__ == "__main__":
  from absl import app, flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.DEFINE_string("workdir", None, "A training run's folder (config.json, checkpoints/).")
  absl_flags.DEFINE_string("images", None, "A folder of images (recursive) or a text list of image paths.")
  absl_flags.DEFINE_enum("modality", None, list(MODALITY_IDS), "Which stem embeds the images.")
  absl_flags.DEFINE_string("out", None, "Output folder for features.npy and index.tsv.")
  absl_flags.DEFINE_string("checkpoint", None, "A step number or a folder <workdir>/checkpoints/<step>; "
                           "default: the latest.")
  absl_flags.mark_flags_as_required(["workdir", "images", "modality", "out"])
  _FLAGS = absl_flags.FLAGS
  app.run(_cli)
