"""Feature extraction with a trained workdir: load its config and checkpoint, embed any images of one modality.

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

import json
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fdnm_jax import checkpoints, precise_bn, sharding
from fdnm_jax.errors import CheckpointError, DataError, FlagError, MissingFileError
from fdnm_jax.evaluation import evaluator
from fdnm_jax.models.fdnm import fdnm_from_config
from fdnm_jax.progress import Progress
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")  # what `pipeline.decode` reads.
MODALITY_IDS = {"visible": VISIBLE, "infrared": INFRARED}


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


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`, written at the start of training), over
  `configs/default.py` so that a run written by an older version gets defaults for the fields it lacks."""
  from configs import default  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), "config.json")
  if not os.path.isfile(path):
    raise MissingFileError(f"{path} not found: --workdir must be a training run's folder (training writes "
                           "config.json there), or pass --config with the run's config.")
  with open(path) as f:
    saved = _tuples(json.load(f))
  return ml_collections.ConfigDict(_merged(default.get_config().to_dict(), saved))


def _state_metadata(step_dir: str) -> dict:
  """The saved train state's tree of orbax ArrayMetadata (shape, dtype) under `<step_dir>/state`."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that the item folder has no step metadata: expected here.
  try:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(os.path.join(step_dir, "state"))
  finally:
    logging.set_verbosity(verbosity)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    raise CheckpointError(f"{step_dir}/state is not a train-state checkpoint of fdnm-jax (no 'params' in it).")
  return tree


def restore_variables(workdir: str, step: int, ckpt_config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> tuple[dict, int]:
  """Restores the Flax variables of `<workdir>/checkpoints/<step>`, replicated over `mesh`.

  The target tree is read from the checkpoint's metadata, so neither the data set nor the number of training
  identities is needed, and the checkpoint restores onto any device count.

  Returns:
    ({"params", "batch_stats"}, num_classes): num_classes = the classifier's output width.
  """
  step_dir = os.path.join(checkpoints.checkpoint_dir(workdir), str(step))
  tree = _state_metadata(step_dir)
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated), tree)
  manager = checkpoints.make_manager(workdir, ckpt_config, read_only=True)
  try:
    state, _ = checkpoints.restore(manager, abstract, step)
  finally:
    manager.close()
  num_classes = int(tree["params"]["classifier"]["kernel"].shape[-1])
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, num_classes


def load_model(workdir: str, checkpoint: Optional[str] = None, config: Optional[ml_collections.ConfigDict] = None,
               mesh: Optional[jax.sharding.Mesh] = None) -> tuple[ml_collections.ConfigDict, Any, dict]:
  """Loads a trained model: (config, model, variables).

  Args:
    workdir: a training run's folder.
    checkpoint: None (latest), a step number, or a folder `<workdir>/checkpoints/<step>`
      (`eval_mode.resolve_checkpoint`).
    config: the run's config; None = `<workdir>/config.json`.
    mesh: the device mesh (default: `config.mesh` over all devices).
  Raises:
    FileNotFoundError: no config.json, no checkpoint, or the requested one does not exist.
  """
  from fdnm_jax.evaluation import eval_mode  # pylint: disable=g-import-not-at-top  (eval_mode imports this module)
  workdir = os.path.abspath(workdir)
  config = load_config(workdir) if config is None else config
  ckpt_workdir, step = eval_mode.resolve_checkpoint(workdir, checkpoint)
  if step is None:
    raise MissingFileError(f"no checkpoint under {checkpoints.checkpoint_dir(workdir)}: train first (python "
                           "main.py --mode=train with this --workdir) or pass --checkpoint=<step folder>.")
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  variables, num_classes = restore_variables(ckpt_workdir, step, config.checkpoint, mesh)
  logging.info("Loaded %s step %d (%d training identities)", checkpoints.checkpoint_dir(ckpt_workdir), step,
               num_classes)
  model = fdnm_from_config(config.model, num_classes)
  model, variables, _ = precise_bn.for_evaluation(model, variables, config, mesh, ckpt_workdir, step)  # as evaluated.
  return config, model, variables


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
    out: output folder (created); config: None = `<workdir>/config.json`.
  Returns:
    {"features": path, "index": path, "num_images": N, "dim": E}.
  """
  if modality not in MODALITY_IDS:
    raise FlagError(f"--modality={modality!r}: use visible or infrared.")
  paths = list_images(images)
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
