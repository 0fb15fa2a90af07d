"""Embeds the test sets with a trained model and scores every retrieval direction.

The model call is jitted with the batch sharded over the mesh; each host feeds its share
of every batch (padded with a mask so all hosts run the same number of steps) and the
embeddings are gathered to every host for the metrics.

Test embedding (`config.evals.embedding`, assembled in one place, `embedding_parts`, from the model's outputs):
- "spec" (FDNM_SPEC §1.4): the L2-normalised BNNeck features of every entry (the branches' globals, then their
  stripes), concatenated: [B, R * D].
- "deen" (DEEN's test code, ZYK100/LLCM DEEN/test.py): per branch, both the L2-normalised pooled (pre-BN) and the
  L2-normalised BNNeck feature, concatenated, so that the dot product of two embeddings is DEEN's sum of the six
  similarity matrices (pooled and BNNeck, for the original and the two nuance branches). FDNM's default keeps no
  original branch (`model.anm_keep_original=False`): the original (the pooled pre-ANM layer4 map, output "global")
  has no BNNeck output then, and enters with its pooled feature only ([B, 5 D]: DEEN's five matrices that exist;
  the BNNeck's running statistics are those of the nuance branches, so passing the original through it would
  normalise it with another distribution's statistics). With the original kept as a branch the embedding is
  DEEN's six parts exactly; with stripes (`model.num_parts`) every stripe entry adds its pooled and BNNeck parts.
Test-time flip (`config.evals.test_flip`, default on, as DEEN and the FDNM reimplementation test): the embedding
of the image plus the embedding of its mirror, not re-normalised (DEEN: `feat_pool1 + feat_pool2`). The retrieval
distance (`metrics.pairwise_distance`) is minus the plain dot product of these embeddings, DEEN's and AGW's
`np.matmul(query_feat, gall_feat.T)`.
"""

import functools
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fdnm_jax import sharding
from fdnm_jax.errors import ConfigError
from fdnm_jax.progress import Progress
from fdnm_jax.evaluation import face, health, protocols
from fdnm_jax.evaluation.metrics import compute_metrics, pairwise_distance
from input_pipeline import pipeline
from input_pipeline.sources import DataSource

MODALITIES = ("visible", "infrared")
RANKS = (1, 5, 10, 20)
EMBEDDINGS = ("spec", "deen")  # config.evals.embedding.


def check_embedding(kind: str) -> None:
  """Raises ConfigError naming `evals.embedding` unless `kind` is one of EMBEDDINGS."""
  if kind not in EMBEDDINGS:
    raise ConfigError(f"evals.embedding={kind!r}: expected one of {EMBEDDINGS}.")


def _is_bnneck(module: nn.Module, method_name: str) -> bool:
  return (method_name == "__call__" and isinstance(module, nn.BatchNorm) and module.name is not None
          and module.name.startswith("bnneck") and len(module.path) == 1)


def model_outputs(model: Any, variables: Any, visible: Optional[jax.Array], infrared: Optional[jax.Array]) -> dict:
  """The eval-mode outputs of the FDNM model, with "bn_features" [R, B, D] (the BNNeck output of every entry of
  "features", same order) added from the model's own BNNeck calls when the model does not return it.

  The BNNeck modules (`bnneck`, `bnneck_part{j}`) each normalise the batch-concatenation of their entries' branches
  ([nb * B, D], branches in order); their outputs are captured (Flax `capture_intermediates`) and split per branch.
  """
  outputs, state = model.apply(variables, visible, infrared, train=False, capture_intermediates=_is_bnneck,
                               mutable=["intermediates"])
  if "bn_features" in outputs:
    return outputs
  num_parts, num_branches = outputs["part_features"].shape[:2]
  names = ["bnneck"] + [f"bnneck_part{j}" for j in range(num_parts)]
  captured = state["intermediates"]
  bn = [piece for name in names for piece in jnp.split(captured[name]["__call__"][0], num_branches, axis=0)]
  return {**outputs, "bn_features": jnp.stack(bn).astype(jnp.float32)}


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) along the last axis (torch.nn.functional.normalize, as the model's embedding)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1e-12)


def entry_names(num_entries: int, num_branches: int, num_nuances: int) -> list[str]:
  """Names of the R entries of "features": the branches (original, nuance1, nuance2 / original), then each
  stripe of each branch ("<branch>_part<j>")."""
  branches = (["original"] if num_branches > num_nuances else []) + [f"nuance{i + 1}" for i in range(num_nuances)]
  parts = [f"{b}_part{j}" for j in range(num_entries // num_branches - 1) for b in branches]
  return branches + parts


def embedding_parts(outputs: Mapping[str, Any], kind: str) -> list[tuple[str, Any]]:
  """The test embedding's parts in order, [(name, [B, D] array)], from `model_outputs` (see the module docstring).

  Args:
    outputs: "features" [R, B, D], "bn_features" [R, B, D], "global" [B, D], "nuances" [N, B, D],
      "part_features" [P, nb, B, D] (for the branch count).
    kind: "spec" or "deen".
  """
  check_embedding(kind)
  features, bn_features = outputs["features"], outputs["bn_features"]
  num_branches, num_nuances = outputs["part_features"].shape[1], outputs["nuances"].shape[0]
  names = entry_names(features.shape[0], num_branches, num_nuances)
  if kind == "spec":
    return [(f"{n}/bnneck", _l2_normalize(bn_features[r])) for r, n in enumerate(names)]
  parts = [] if num_branches > num_nuances else [("original/pooled", _l2_normalize(outputs["global"]))]
  for r, n in enumerate(names):
    parts += [(f"{n}/pooled", _l2_normalize(features[r])), (f"{n}/bnneck", _l2_normalize(bn_features[r]))]
  return parts


def test_embedding(outputs: Mapping[str, Any], kind: str) -> jax.Array:
  """float32 [B, E]: the concatenated `embedding_parts`."""
  return jnp.concatenate([x for _, x in embedding_parts(outputs, kind)], axis=-1).astype(jnp.float32)


def embedding_layout(model: Any, variables: Any, kind: str, image_shape: tuple[int, int]) -> list[tuple[str, int]]:
  """[(part name, width)] of the test embedding of `kind` (shapes only: the model is not run).

  Kept per (model, kind, image shape, the variables' tree and shapes), as `make_embed_fn` keeps its functions: the
  layout is a function of these, and each evaluation of a run asks for it (~0.3 s to trace the tiny test model on
  2 cores).
  """
  leaves, treedef = jax.tree.flatten(variables)
  shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
  try:
    return list(_cached_layout(model, kind, tuple(image_shape), treedef, shapes))
  except TypeError:  # an unhashable model: computed each time.
    return _embedding_layout(model, variables, kind, image_shape)


@functools.lru_cache(maxsize=64)
def _cached_layout(model: Any, kind: str, image_shape: tuple[int, int], treedef: Any,
                   shapes: tuple) -> tuple[tuple[str, int], ...]:
  variables = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes])
  return tuple(_embedding_layout(model, variables, kind, image_shape))


def _embedding_layout(model: Any, variables: Any, kind: str, image_shape: tuple[int, int]) -> list[tuple[str, int]]:
  names: list[str] = []

  def parts(variables, images):
    found = embedding_parts(model_outputs(model, variables, images, None), kind)
    names.extend(n for n, _ in found)
    return [x for _, x in found]

  shapes = jax.eval_shape(parts, variables, jax.ShapeDtypeStruct((1, *image_shape, 3), jnp.float32))
  return [(n, int(s.shape[-1])) for n, s in zip(names, shapes)]


def make_embed_fn(model: Any, mesh: jax.sharding.Mesh, modality: str, embedding: str) -> Callable:
  """A jitted fn(variables, images [b,H,W,3]) -> embeddings [b,E] float32 for one modality (`test_embedding` of
  kind `embedding`, config.evals.embedding).

  The same function for equal arguments (Flax modules compare by their fields), so every evaluation of a run (each
  `evals.every_steps`, the final one, the eval mode) reuses one trace and one compiled program per input shape
  instead of tracing the model again (~0.5 s per modality for the tiny test model on 2 cores).
  """
  if modality not in MODALITIES:
    raise ValueError(f"modality {modality!r}: use one of {MODALITIES}")
  check_embedding(embedding)
  try:
    return _cached_embed_fn(model, mesh, modality, embedding)
  except TypeError:  # an unhashable model: a fresh function.
    return _embed_fn(model, mesh, modality, embedding)


def _embed_fn(model: Any, mesh: jax.sharding.Mesh, modality: str, embedding: str) -> Callable:
  def embed(variables, images):
    inputs = (images, None) if modality == "visible" else (None, images)
    return test_embedding(model_outputs(model, variables, *inputs), embedding)

  return jax.jit(embed, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


_cached_embed_fn = functools.lru_cache(maxsize=16)(_embed_fn)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_image_set(embed_fn: Callable, variables: Any, image_set: Any, input_config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, flip: bool = False, progress: Optional[Progress] = None) -> np.ndarray:
  """Embeddings of every image of `image_set`, in file order.

  Multi-host: the global batch size is `config.input.eval_batch_size` rounded up to a multiple of the mesh's
  batch shards (a multiple of the process count); every host runs ceil(N / batch) steps on its share, the
  last batch padded with zero images (mask False). Each image's file index travels with it, so the result
  does not depend on where the mesh places each host's rows; the embeddings, indices and masks are gathered
  to every host (`process_allgather`) and the padding dropped. `progress`, when given, counts the real images of
  each batch (the caller calls its `done()`).

  Returns:
    float32 [len(image_set), E]; with `flip`, the sum of the embeddings of each image and its mirror (not
    re-normalised, as DEEN tests).
  """
  shards = sharding.num_batch_shards(mesh)
  batch_size = math.ceil(input_config.eval_batch_size / shards) * shards
  chunks = []
  for batch in pipeline.eval_batches(image_set, input_config, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count(), flip=flip):
    arrays = {"images": batch["images"], "index": batch["index"], "mask": batch["mask"]}
    if flip:
      arrays["images_flipped"] = batch["images_flipped"]
    g = sharding.host_to_global(arrays, mesh)
    emb = embed_fn(variables, g["images"])
    if flip:
      emb = emb + embed_fn(variables, g["images_flipped"])
    emb, index, mask = _to_host(emb), _to_host(g["index"]), _to_host(g["mask"])
    chunks.append((emb[mask], index[mask]))
    if progress is not None:
      progress.update(int(mask.sum()))
  if not chunks:
    return np.zeros((0, 0), np.float32)
  emb = np.concatenate([c[0] for c in chunks])
  index = np.concatenate([c[1] for c in chunks])
  result = np.zeros((len(image_set), emb.shape[1]), np.float32)
  result[index] = emb
  return result


def score_directions(source: DataSource, embeddings: Mapping[str, np.ndarray], max_rank: int = 20,
                     query_chunk: int = 1024) -> dict[str, dict[str, Any]]:
  """Rank-k / mAP / mINP of every direction of `source`, from test-set embeddings.

  Args:
    source: the data source (its test sets give person ids and cameras).
    embeddings: test-set name -> float32 [N, E].
  Returns:
    direction name -> {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP" (percent), "cmc" (list, fractions),
    "num_query", "num_gallery"}.
  """
  results = {}
  for d in source.directions:
    q, g = source.test_sets[d.query], source.test_sets[d.gallery]
    dist = np.asarray(pairwise_distance(jnp.asarray(embeddings[d.query]), jnp.asarray(embeddings[d.gallery])))
    m = compute_metrics(dist, q.labels, g.labels, q.cameras, g.cameras, source.protocol, max_rank=max_rank,
                        query_chunk=query_chunk)
    cmc = np.asarray(m["cmc"], np.float64)
    row = {f"rank{k}": 100.0 * float(cmc[k - 1]) for k in RANKS if k <= max_rank}
    row.update({"mAP": 100.0 * float(m["mAP"]), "mINP": 100.0 * float(m["mINP"]), "cmc": cmc.tolist(),
                "num_query": int(len(q)), "num_gallery": int(len(g))})
    results[d.name] = row
  return results


def embed_test_sets(model: Any, variables: Any, source: DataSource, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Embeds every test set of `source` once, with the stem of its modality (flip TTA per config.evals.test_flip),
  logging a progress line per set.

  Returns:
    test-set name -> float32 [N, E] embeddings in the set's file order.
  """
  modality_of = {name: ("visible" if s.modality == 0 else "infrared") for name, s in source.test_sets.items()}
  embed_fns = {m: make_embed_fn(model, mesh, m, config.evals.embedding) for m in set(modality_of.values())}
  embeddings = {}
  for name, s in source.test_sets.items():
    progress = Progress(f"embed test set {name}", total=len(s), unit="img")
    embeddings[name] = embed_image_set(embed_fns[modality_of[name]], variables, s, config.input, mesh,
                                       flip=config.evals.test_flip, progress=progress)
    progress.done()
  return embeddings


def summary_row(result: Mapping[str, Any]) -> dict[str, Any]:
  """One `protocols.run_protocols` setting result as a flat row: the mean Rank-k / mAP / mINP (percent), their
  population std over trials as `<metric>_std`, the mean CMC ("cmc", fractions), "num_query", "num_gallery"
  (of the first trial) and "trials" (their count)."""
  row = dict(result["mean"])
  row.update({f"{k}_std": v for k, v in result["std"].items()})
  row.update({"cmc": list(result["cmc_mean"]), "num_query": result["num_query"],
              "num_gallery": result["num_gallery"][0], "trials": len(result["trials"])})
  return row


def evaluate(model: Any, variables: Any, source: DataSource, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict[str, dict[str, Any]]:
  """Embeds every test set of `source` once and scores every protocol setting of the data set.

  Returns:
    setting name -> `summary_row` (RegDB / synthetic: one setting per direction, one trial; SYSU-MM01: all/indoor
    x single/multi-shot, 10 trials; LLCM: one per direction, 10 trials).
  """
  return evaluate_with_health(model, variables, source, config, mesh)[0]


def evaluate_with_health(model: Any, variables: Any, source: DataSource, config: ml_collections.ConfigDict,
                         mesh: jax.sharding.Mesh, checkpoint_batch_stats: Optional[Any] = None
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """`evaluate`, and the embedding health of the same embeddings (`health_of`; warnings logged)."""
  embeddings = embed_test_sets(model, variables, source, config, mesh)
  settings = protocols.settings_for(source, config)
  results = protocols.run_protocols(source, embeddings, settings, config.evals.max_rank, config.evals.query_chunk)
  return ({name: summary_row(r) for name, r in results.items()},
          health_of(model, variables, source, embeddings, config, checkpoint_batch_stats))


def health_of(model: Any, variables: Any, source: DataSource, embeddings: Mapping[str, np.ndarray],
              config: ml_collections.ConfigDict, checkpoint_batch_stats: Optional[Any] = None) -> dict[str, Any]:
  """The health section of a report (`health.health_report`) for test-set embeddings of `source`, computed with
  `variables`; logs its table, and each warning as a warning line.

  Args:
    checkpoint_batch_stats: the checkpoint's own batch statistics when `variables` holds recalibrated ones (their
      BNNeck variances are reported beside); None otherwise.
  """
  modality_of = {name: ("visible" if s.modality == 0 else "infrared") for name, s in source.test_sets.items()}
  layout = embedding_layout(model, variables, config.evals.embedding, (config.input.height, config.input.width))
  report = health.health_report({k: np.asarray(v) for k, v in embeddings.items()}, modality_of, layout,
                                jax.device_get(variables["batch_stats"]), config.evals.health_max_mean_cosine,
                                None if checkpoint_batch_stats is None else jax.device_get(checkpoint_batch_stats))
  logging.info("Embedding health (%s):\n%s", source.name, health.format_markdown(report))
  for line in report["warnings"]:
    logging.warning("%s", line)
  return report


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A Markdown table: one row per protocol setting (direction), Rank-1/5/10/20, mAP and mINP in percent (face
  settings: Rank-1, VR@FAR=1%, VR@FAR=0.1%, "mean ± std" over the folds when several are scored)."""
  metrics = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP") + face.METRICS[1:]
  cols = [c for c in metrics if any(c in r for r in results.values())]
  header = "| setting | " + " | ".join(face.LABELS.get(c, c.replace("rank", "Rank-")) for c in cols) + " |"
  lines = [header, "|" + "---|" * (len(cols) + 1)]
  for name, r in results.items():
    folds = any(k in r for k in face.METRICS[1:]) and r.get("trials", 1) > 1
    cells = [(f"{r[c]:.2f} ± {r[c + '_std']:.2f}" if folds else f"{r[c]:.2f}") if c in r else "—" for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
