"""Embeds the test sets with a trained model and scores every retrieval direction.

The model call is jitted with the batch sharded over the mesh; each host feeds its share
of every batch (padded with a mask so all hosts run the same number of steps) and the
embeddings are gathered to every host for the metrics.
"""

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fdnm_jax import sharding
from fdnm_jax.progress import Progress
from fdnm_jax.evaluation import face, protocols
from fdnm_jax.evaluation.metrics import compute_metrics, pairwise_distance
from input_pipeline import pipeline
from input_pipeline.sources import DataSource

MODALITIES = ("visible", "infrared")
RANKS = (1, 5, 10, 20)


def make_embed_fn(model: Any, mesh: jax.sharding.Mesh, modality: str) -> Callable:
  """A jitted fn(variables, images [b,H,W,3]) -> embeddings [b,E] float32 for one modality."""
  if modality not in MODALITIES:
    raise ValueError(f"modality {modality!r}: use one of {MODALITIES}")

  def embed(variables, images):
    inputs = (images, None) if modality == "visible" else (None, images)
    return model.apply(variables, *inputs, train=False)["embedding"].astype(jnp.float32)

  return jax.jit(embed, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


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
    float32 [len(image_set), E]; with `flip`, the sum of the embeddings of each image and its mirror.
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
  embed_fns = {m: make_embed_fn(model, mesh, m) for m in set(modality_of.values())}
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
  embeddings = embed_test_sets(model, variables, source, config, mesh)
  settings = protocols.settings_for(source, config)
  results = protocols.run_protocols(source, embeddings, settings, config.evals.max_rank, config.evals.query_chunk)
  return {name: summary_row(r) for name, r in results.items()}


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
