"""`python main.py --mode=eval`: evaluate a checkpoint of a workdir under every protocol setting of its data set.

  python main.py --mode=eval --workdir=runs/sysu                 # the workdir's config.json, its latest checkpoint
  python main.py --mode=eval --workdir=runs/sysu --checkpoint=5000            # a step of <workdir>/checkpoints
  python main.py --mode=eval --workdir=runs/sysu --checkpoint=/runs/x/checkpoints/5000
  python main.py --mode=eval --workdir=runs/sysu --config=configs/sysu.py --config.evals.rerank=True

The config is the workdir's `config.json`; a `--config` given as well may change only evaluation fields (evals.*,
input.eval_batch_size, data.root, ...): a differing model field is an error (`inference.resolve_config`), and the
report lists what was overridden. Only the test sets are read (`sources.load_test_source`): no training list,
sampler or optimizer, so a copy of the data set without its training part evaluates. The checkpoint is restored
by the one restore path of eval, extract and visualize (`inference.load_model`: params and BN statistics, from
the checkpoint's metadata). The test sets are embedded once; the protocol settings (`protocols.settings_for`) draw
their galleries from those embeddings. The report goes to `<workdir>/results/eval_<name>_step<step>[_rerank].json`
and `.md`.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections

from fdnm_jax import checkpoints, inference, precise_bn, pretrained, sharding, train
from fdnm_jax.errors import MissingFileError
from fdnm_jax.evaluation import evaluator, health, protocols, published
from fdnm_jax.progress import Progress
from input_pipeline import sources

UNTRAINED_BANNER = "UNTRAINED MODEL: randomly initialised weights, no checkpoint was restored"
RERANK_BANNER = "k-reciprocal re-ranking ON (k1={k1}, k2={k2}, lambda={lambda_value})"


resolve_checkpoint = checkpoints.resolve  # (workdir, checkpoint) -> (workdir holding it, step) or (None, None).


def _no_checkpoint_error(workdir: str, checkpoint: Optional[str]) -> MissingFileError:
  return MissingFileError(
      f"no checkpoint to evaluate under {checkpoints.checkpoint_dir(workdir)}"
      f"{'' if checkpoint is None else f' (--checkpoint={checkpoint})'}: train first "
      f"(python main.py --mode=train with a --config and this --workdir), or pass --allow_untrained to evaluate "
      "the randomly initialised model.")


def rerank_of(config: ml_collections.ConfigDict) -> Optional[protocols.Rerank]:
  """The re-ranking parameters of config.evals, or None when config.evals.rerank is off."""
  e = config.evals
  return protocols.Rerank(e.rerank_k1, e.rerank_k2, e.rerank_lambda) if e.rerank else None


def _banners(report: dict) -> list[str]:
  banners = []
  if report["untrained"]:
    banners.append(UNTRAINED_BANNER)
  if report["rerank"]["enabled"]:
    r = report["rerank"]
    banners.append(RERANK_BANNER.format(k1=r["k1"], k2=r["k2"], lambda_value=r["lambda"]))
  return banners


def report_stem(report: dict) -> str:
  """File name (no extension) of a report: eval_<name>_step<step>[_UNTRAINED][_rerank]."""
  stem = f"eval_{report['name']}_step{report['step']}"
  if report["untrained"]:
    stem += "_UNTRAINED"
  if report["rerank"]["enabled"]:
    stem += "_rerank"
  return stem


def format_summary(report: dict) -> str:
  """Markdown title, banners (UNTRAINED, re-ranking), checkpoint, the table (mean ± std over trials), then the
  peers' published numbers for the same settings (`published.format_published`, labelled quoted, not measured)."""
  title = f"{report['name']} ({report['dataset']}), " + (
      "UNTRAINED" if report["untrained"] else f"checkpoint step {report['step']}") + (
      f", {report['init']}" if report.get("init") and not report["untrained"] else "")
  lines = [f"# Evaluation: {title}", ""]
  lines += [f"**{b}**" for b in _banners(report)] + ([""] if _banners(report) else [])
  lines += [f"- checkpoint: {report['checkpoint'] or 'none (untrained)'}",
            f"- protocol: {report['protocol']}; test-time flip: {report['test_flip']}; "
            f"re-ranking: {'on' if report['rerank']['enabled'] else 'off'}"]
  lines += [f"- {line}" for line in report.get("config_origin", [])]
  lines += [
            "- numbers: percent; mean ± population std over the trials where a setting has several", "",
            protocols.format_protocol_table(report["settings"]), "",
            published.format_published(report["dataset"], list(report["settings"]),
                                       reranked=report["rerank"]["enabled"])]
  lines += ["", health.format_markdown(report.get("health")), "",
            health.format_recalibration(report.get("precise_bn"))]
  return "\n".join(lines)


def format_report(report: dict) -> str:
  """The Markdown report: the summary, then each setting's gallery sampling and the config as JSON."""
  lines = [format_summary(report), "", "## Gallery sampling", ""]
  lines += [f"- {name}: {family}" for name, family in report["gallery_sampling"].items()]
  lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2, sort_keys=True), "```", ""]
  return "\n".join(lines)


def _write(workdir: str, report: dict) -> dict[str, str]:
  results = os.path.join(workdir, "results")
  os.makedirs(results, exist_ok=True)
  stem = os.path.join(results, report_stem(report))
  paths = {"json": stem + ".json", "md": stem + ".md"}
  train.write_json(paths["json"], report)
  with open(paths["md"] + ".tmp", "w") as f:
    f.write(format_report(report))
  os.replace(paths["md"] + ".tmp", paths["md"])
  return paths


def score_settings(source: Any, embeddings: dict, settings: Any, config: ml_collections.ConfigDict,
                   rerank: Optional[protocols.Rerank]) -> dict[str, dict]:
  """`protocols.run_protocols` one setting at a time, with a progress line counting trials."""
  names = [s.name for s in settings]
  if len(set(names)) != len(names):
    raise ValueError(f"setting names must be unique: {names}")
  progress = Progress("score settings", total=sum(len(s.trials) for s in settings), unit="trial")
  results = {}
  for s in settings:
    results[s.name] = protocols.run_setting(source, embeddings, s, config.evals.max_rank, config.evals.query_chunk,
                                            rerank)
    progress.update(len(s.trials))
  progress.done()
  return results


def evaluate_checkpoint(config: Optional[ml_collections.ConfigDict], workdir: str, checkpoint: Optional[str] = None,
                        allow_untrained: bool = False) -> dict:
  """Evaluates a checkpoint of `workdir` under every protocol setting of its data set; writes and prints the report.

  Args:
    config: a --config, or None: the workdir's config.json (`inference.resolve_config`: a given config may differ
      from config.json in evaluation fields only; without config.json it is used as given).
    workdir: the run's folder; the report goes to `<workdir>/results/`.
    checkpoint: None = the latest step of the workdir; a step number; or a folder `<workdir>/checkpoints/<step>`.
    allow_untrained: with no checkpoint at all, evaluate the randomly initialised model (the report says
      UNTRAINED everywhere) instead of failing. A requested `checkpoint` must exist regardless.
  Returns:
    The report: {"name", "dataset", "protocol", "step" (0 untrained), "untrained", "checkpoint" (folder or None),
    "test_flip", "rerank" {"enabled", "k1", "k2", "lambda"}, "gallery_sampling" {setting: family},
    "settings" (`protocols.run_protocols`), "published" {setting: quoted rows of docs/published_results.md},
    "config" (dict), "config_origin" (where it came from, overrides, ignored fields), "config_overrides",
    "files" {"json", "md"}}.
  Raises:
    MissingFileError: no checkpoint (and not allow_untrained), the requested one does not exist, or neither a
      config.json nor a --config.
    ConfigError: --config differs from config.json in a model field (or the input size, data set, split).
    CheckpointError: the checkpoint cannot be read or does not fit the model.
  """
  workdir = os.path.abspath(workdir)
  ckpt_workdir, step = resolve_checkpoint(workdir, checkpoint)
  if step is None and not allow_untrained:
    raise _no_checkpoint_error(workdir, checkpoint)
  resolved = inference.resolve_config(workdir, config)
  config = resolved.config
  if jax.process_index() == 0:  # only process 0 writes the reports.
    train.ensure_writable_dir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  source = sources.load_test_source(config, workdir)
  untrained = step is None
  if untrained:
    model, trained = inference.init_variables(config, mesh)
  else:
    model, trained = inference.restore_model(ckpt_workdir, step, config, mesh)
  # Precise BN (config.evals.recalibrate_bn_batches): statistics saved beside the checkpoint are reused; computing
  # them reads the training set.
  model, variables, recalibration = precise_bn.for_evaluation(model, trained, config, mesh, ckpt_workdir, step)
  embeddings = evaluator.embed_test_sets(model, variables, source, config, mesh)
  settings = protocols.settings_for(source, config)
  rerank = rerank_of(config)
  results = score_settings(source, embeddings, settings, config, rerank)
  report = {
      "name": config.name, "dataset": config.dataset, "protocol": source.protocol,
      "step": 0 if untrained else step, "untrained": untrained, "init": pretrained.init_label(config.model),
      "checkpoint": None if untrained else checkpoints.step_path(ckpt_workdir, step),
      "test_flip": bool(config.evals.test_flip),
      "rerank": {"enabled": rerank is not None, "k1": config.evals.rerank_k1, "k2": config.evals.rerank_k2,
                 "lambda": config.evals.rerank_lambda},
      "gallery_sampling": {s.name: s.family for s in settings},
      "settings": results,
      "published": {s.name: published.rows_for(config.dataset, s.name) for s in settings},
      "config": json.loads(config.to_json_best_effort()),
      "config_origin": resolved.describe(),
      "config_overrides": {c.key: c.new for c in resolved.overridden},
      "embedding": config.evals.embedding, "precise_bn": recalibration,
      "health": evaluator.health_of(model, variables, source, embeddings, config,
                                    trained["batch_stats"] if recalibration else None),
  }
  if untrained:
    report["warning"] = UNTRAINED_BANNER
  if jax.process_index() == 0:
    report["files"] = _write(workdir, report)
    print(format_summary(report))
  return report
