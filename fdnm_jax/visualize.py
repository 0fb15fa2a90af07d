"""`python main.py --mode=visualize`: rank lists, distance histograms and t-SNE scatters of a trained workdir.

  python main.py --mode=visualize --workdir=runs/synthetic [--queries=6 | --queries=0,17,42] \
      [--compare_workdir=runs/synthetic_baseline] [--checkpoint=STEP]

For each retrieval direction of the data set (its first protocol setting, first trial: e.g. SYSU-MM01 all-search
single-shot with gallery seed 0), it writes into `<workdir>/visualize/`:
  - `ranklist_<setting>.png`: each chosen query, then its top-k gallery images (config.visualize.top_k), framed
    green (same identity) or red (another), captioned "id 12 / IR cam3 / d=0.412"; the gallery items the protocol
    does not rank for that query (SYSU cam-2 for cam-3 queries, LLCM same identity and camera) are left out.
  - `distances.png`: per setting (rows) and run (columns: this workdir, then --compare_workdir), the histograms of
    the intra-class and inter-class cross-modality distances with their means and overlap (`plots.distances`).
  - `tsne_<setting>.png`: t-SNE of the setting's queries and gallery of the first config.visualize.tsne_max_ids
    query identities (ascending ids), colour = identity, marker = modality (`plots.tsne`).
  - `summary.json`: the numbers behind the figures (chosen queries and their top-k, means, overlaps).
Distances are Euclidean between L2-normalised embeddings (the same ranking as the evaluator's -cos).
"""

import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from fdnm_jax import inference, sharding, train
from fdnm_jax.errors import FlagError
from fdnm_jax.evaluation import evaluator, metrics, protocols
from fdnm_jax.plots import distances as dist_plots
from fdnm_jax.plots import ranklist, tsne
from fdnm_jax.plots.common import camera_label
from fdnm_jax.progress import Progress
from input_pipeline import sources

DEFAULTS = {"top_k": 10, "num_bins": 50, "tsne_max_ids": 20, "tsne_perplexity": 30.0, "seed": 0}  # = default.py


def visualize_config(config: ml_collections.ConfigDict) -> dict:
  """config.visualize as a dict, with DEFAULTS for fields a workdir's older config.json lacks."""
  section = config.get("visualize")
  return {k: (section.get(k, v) if section is not None else v) for k, v in DEFAULTS.items()}


def parse_queries(spec: str, num_queries: int) -> np.ndarray:
  """Positions of the chosen queries among a setting's `num_queries` queries.

  Args:
    spec: "n" (one integer: n queries evenly spaced over the query list, first and last included) or a
      comma-separated list of positions "0,17,42" (a trailing comma makes one position: "5,").
  Raises:
    ValueError: not integers, n < 1, or a position outside 0..num_queries-1 (the message gives the range).
  """
  text = str(spec).strip()
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise FlagError(f"--queries={spec!r}: give a count n or comma-separated query positions (0,5,9).") from None
  if not values:
    raise FlagError(f"--queries={spec!r}: give a count n or comma-separated query positions (0,5,9).")
  if "," not in text:
    n = values[0]
    if n < 1:
      raise FlagError(f"--queries={spec!r}: the count must be at least 1.")
    return np.unique(np.linspace(0, num_queries - 1, min(n, num_queries)).round().astype(np.int64))
  bad = [v for v in values if not 0 <= v < num_queries]
  if bad:
    raise FlagError(f"--queries={spec!r}: positions {bad} outside 0..{num_queries - 1} (the setting has "
                    f"{num_queries} queries).")
  return np.asarray(values, np.int64)


def display_settings(settings: Sequence[protocols.Setting]) -> list[protocols.Setting]:
  """The first setting of each (query set, gallery set) direction, in order."""
  seen, out = set(), []
  for s in settings:
    if (s.query, s.gallery) not in seen:
      seen.add((s.query, s.gallery))
      out.append(s)
  return out


def setting_arrays(source: Any, embeddings: dict, setting: protocols.Setting) -> dict:
  """The first trial of `setting`: query/gallery indices, embeddings, ids, cameras, [Q, G] distances and kept mask."""
  q_set, g_set = source.test_sets[setting.query], source.test_sets[setting.gallery]
  q_idx = protocols.query_indices(setting, q_set)
  g_idx = protocols.gallery_indices(setting, g_set, setting.trials[0])
  q_pids, g_pids = q_set.labels[q_idx], g_set.labels[g_idx]
  q_cams, g_cams = q_set.cameras[q_idx], g_set.cameras[g_idx]
  kept = np.asarray(metrics._kept(np, setting.protocol, q_pids[:, None], q_cams[:, None],  # pylint: disable=protected-access
                                  g_pids[None, :], g_cams[None, :]), bool)
  q_emb, g_emb = embeddings[setting.query][q_idx], embeddings[setting.gallery][g_idx]
  return {"q_set": q_set, "g_set": g_set, "q_idx": q_idx, "g_idx": g_idx, "q_pids": q_pids, "g_pids": g_pids,
          "q_cams": q_cams, "g_cams": g_cams, "kept": kept, "q_emb": q_emb, "g_emb": g_emb,
          "dist": dist_plots.l2_distances(q_emb, g_emb)}


def _embed_run(workdir: str, checkpoint: Optional[str], config: Optional[ml_collections.ConfigDict],
               source: Any) -> tuple[ml_collections.ConfigDict, dict]:
  config, model, variables = inference.load_model(workdir, checkpoint, config)
  mesh = sharding.make_mesh(config.mesh)
  return config, evaluator.embed_test_sets(model, variables, source, config, mesh)


def _rank_list(path: str, a: dict, setting: protocols.Setting, positions: np.ndarray, k: int) -> tuple[str, list]:
  rows = []
  for pos in positions:
    qi = a["q_idx"][pos]
    rows.append(ranklist.query_row(
        a["q_set"].paths[qi], a["q_pids"][pos], camera_label(a["q_set"].modality, a["q_cams"][pos]),
        a["dist"][pos], a["kept"][pos], k, [a["g_set"].paths[j] for j in a["g_idx"]], a["g_pids"],
        a["g_set"].modality, a["g_cams"]))
    rows[-1]["position"] = int(pos)
  title = f"{setting.name}: {setting.query} queries -> {setting.gallery} gallery (trial {setting.trials[0]})"
  return ranklist.plot_rank_list(path, rows, k, title), rows


def _tsne(path: str, a: dict, setting: protocols.Setting, vis: dict, run_name: str) -> tuple[str, dict]:
  ids = np.unique(a["q_pids"])[:vis["tsne_max_ids"]]
  q_sel, g_sel = np.isin(a["q_pids"], ids), np.isin(a["g_pids"], ids)
  x = np.concatenate([a["q_emb"][q_sel], a["g_emb"][g_sel]])
  pids = np.concatenate([a["q_pids"][q_sel], a["g_pids"][g_sel]])
  mods = np.concatenate([np.full(q_sel.sum(), a["q_set"].modality), np.full(g_sel.sum(), a["g_set"].modality)])
  coords = tsne.embed_2d(x, vis["tsne_perplexity"], vis["seed"])
  title = f"{run_name}: t-SNE of {setting.name} ({setting.query} queries + {setting.gallery} gallery)"
  return tsne.plot_tsne(path, coords, pids, mods, title), {"num_points": int(len(x)), "ids": ids.tolist()}


def visualize(workdir: str, config: Optional[ml_collections.ConfigDict] = None, checkpoint: Optional[str] = None,
              queries: str = "4", compare_workdir: Optional[str] = None,
              compare_checkpoint: Optional[str] = None) -> dict:
  """Writes the rank lists, distance histograms and t-SNE scatters of `workdir` into `<workdir>/visualize/`.

  Args:
    workdir: a trained run's folder; config: None = `<workdir>/config.json`, or a --config that may differ from it
      in evaluation fields only (`inference.resolve_config`); checkpoint: None (latest), a step or a step folder.
    queries: `parse_queries` spec, applied to each direction's query list.
    compare_workdir: a second run (e.g. the baseline ablation) whose histograms go beside this run's; it is
      embedded on this run's data source with its own config.json and latest (or compare_checkpoint) checkpoint.
  Returns:
    {"files": {"ranklist/<setting>", "tsne/<setting>", "distances", "summary"}: paths, "settings": {setting:
    {"queries": rank-list rows, "distances": {run: summary}, "tsne": {...}}}} (also in summary.json).
  """
  workdir = os.path.abspath(workdir)
  config = inference.resolve_config(workdir, config).config
  vis = visualize_config(config)
  source = sources.load_test_source(config, workdir)
  runs = [(os.path.basename(workdir), *_embed_run(workdir, checkpoint, config, source))]
  if compare_workdir:
    compare_workdir = os.path.abspath(compare_workdir)
    runs.append((os.path.basename(compare_workdir) + " (compare)",
                 *_embed_run(compare_workdir, compare_checkpoint, None, source)))
  shown = display_settings(protocols.settings_for(source, config))
  out_dir = os.path.join(workdir, "visualize")
  result = {"files": {}, "settings": {}}
  if jax.process_index() != 0:
    return result
  train.ensure_writable_dir(out_dir)
  panels = []
  progress = Progress("visualize", total=len(shown), unit="setting", every_s=0)
  for setting in shown:
    arrays = [setting_arrays(source, emb, setting) for _, _, emb in runs]
    a = arrays[0]
    positions = parse_queries(queries, len(a["q_idx"]))
    entry = {"query": setting.query, "gallery": setting.gallery, "trial": int(setting.trials[0]), "distances": {}}
    path, entry["queries"] = _rank_list(os.path.join(out_dir, f"ranklist_{setting.name}.png"), a, setting,
                                        positions, int(vis["top_k"]))
    result["files"][f"ranklist/{setting.name}"] = path
    row = []
    for (name, _, _), arr in zip(runs, arrays):
      intra, inter = dist_plots.intra_inter(arr["dist"], arr["q_pids"], arr["g_pids"], arr["kept"])
      bins = dist_plots.panel_bins(intra, inter, vis["num_bins"])
      s = dist_plots.summary(intra, inter, bins)
      entry["distances"][name] = s
      row.append({"intra": intra, "inter": inter, "bins": bins, "summary": s})
    panels.append(row)
    path, entry["tsne"] = _tsne(os.path.join(out_dir, f"tsne_{setting.name}.png"), a, setting, vis, runs[0][0])
    result["files"][f"tsne/{setting.name}"] = path
    result["settings"][setting.name] = entry
    progress.update()
  progress.done()
  result["files"]["distances"] = dist_plots.plot_histograms(
      os.path.join(out_dir, "distances.png"), panels, [r[0] for r in runs], [s.name for s in shown])
  result["files"]["summary"] = os.path.join(out_dir, "summary.json")
  train.write_json(result["files"]["summary"], result)
  for name, path in result["files"].items():
    logging.info("visualize: %s -> %s", name, path)
  return result
