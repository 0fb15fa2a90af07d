"""`python main.py --mode=eval`: evaluate a checkpoint under every protocol setting of its data set.

  python main.py --mode=eval --config=configs/sysu.py --workdir=runs/sysu --config.data.root=/data/SYSU-MM01
  python main.py --mode=eval ... --checkpoint=5000            # a step of <workdir>/checkpoints
  python main.py --mode=eval ... --checkpoint=/runs/x/checkpoints/5000
  python main.py --mode=eval ... --config.evals.rerank=True   # k-reciprocal re-ranking

The test sets are embedded once; the protocol settings (`protocols.settings_for`) draw their galleries from
those embeddings. The report goes to `<workdir>/results/eval_<name>_step<step>[_rerank].json` and `.md`.
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections

from fdnm_jax import checkpoints, precise_bn, pretrained, sharding, train
from fdnm_jax.errors import FlagError, MissingFileError
from fdnm_jax.evaluation import evaluator, health, protocols, published
from fdnm_jax.progress import Progress

UNTRAINED_BANNER = "UNTRAINED MODEL: randomly initialised weights, no checkpoint was restored"
RERANK_BANNER = "k-reciprocal re-ranking ON (k1={k1}, k2={k2}, lambda={lambda_value})"


def _steps(ckpt_dir: str) -> list[int]:
  """The step folders (integer names) of a checkpoint folder, ascending; [] if it does not exist."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def resolve_checkpoint(workdir: str, checkpoint: Optional[str]) -> tuple[Optional[str], Optional[int]]:
  """Which checkpoint to evaluate: (the workdir holding it, its step), or (None, None) when there is none.

  Args:
    workdir: the run's folder (checkpoints under `<workdir>/checkpoints/<step>`).
    checkpoint: None (the latest step of the workdir), a step number ("5000"), or a step folder
      (".../checkpoints/5000").
  Raises:
    FileNotFoundError: the requested step or folder does not exist (the message lists the steps there are).
    ValueError: `checkpoint` is neither a step number nor a step folder.
  """
  if checkpoint is None:
    steps = _steps(checkpoints.checkpoint_dir(workdir))
    return (workdir, steps[-1]) if steps else (None, None)
  text = str(checkpoint).strip()
  if text.isdigit():
    steps = _steps(checkpoints.checkpoint_dir(workdir))
    if int(text) not in steps:
      raise MissingFileError(f"--checkpoint={text}: no step {int(text)} under {checkpoints.checkpoint_dir(workdir)} "
                             f"(steps there: {steps or 'none'}). Pick one of those steps or a checkpoint folder.")
    return workdir, int(text)
  folder = os.path.abspath(text.rstrip("/"))
  if not os.path.isdir(folder):
    raise MissingFileError(f"--checkpoint={text}: folder {folder} does not exist. Pass a step number of "
                           f"{checkpoints.checkpoint_dir(workdir)} or a folder <workdir>/checkpoints/<step>.")
  parent, step = os.path.split(folder)
  if not step.isdigit() or os.path.basename(parent) != "checkpoints":
    raise FlagError(f"--checkpoint={text}: expected a step number or a folder <workdir>/checkpoints/<step> "
                    f"(as training writes them), got {folder}.")
  return os.path.dirname(parent), int(step)


def _no_checkpoint_error(workdir: str, checkpoint: Optional[str]) -> MissingFileError:
  return MissingFileError(
      f"no checkpoint to evaluate under {checkpoints.checkpoint_dir(workdir)}"
      f"{'' if checkpoint is None else f' (--checkpoint={checkpoint})'}: train first "
      f"(python main.py --mode=train with the same --config and --workdir), or pass --allow_untrained to evaluate "
      "the randomly initialised model.")


def _restore(config: ml_collections.ConfigDict, run: train.Run, ckpt_workdir: str, step: int) -> Any:
  manager = checkpoints.make_manager(ckpt_workdir, config.checkpoint, read_only=True)
  try:
    state, _ = checkpoints.restore(manager, run.abstract_state, step)
  finally:
    manager.close()
  return state


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
            f"re-ranking: {'on' if report['rerank']['enabled'] else 'off'}",
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


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, checkpoint: Optional[str] = None,
                        allow_untrained: bool = False) -> dict:
  """Evaluates a checkpoint of `workdir` under every protocol setting of `config.dataset`; writes and prints it.

  Args:
    config: the run's config (data set, model, evals.*).
    workdir: the run's folder; the report goes to `<workdir>/results/`.
    checkpoint: None = the latest step of the workdir; a step number; or a folder `<workdir>/checkpoints/<step>`.
    allow_untrained: with no checkpoint at all, evaluate the randomly initialised model (the report says
      UNTRAINED everywhere) instead of failing. A requested `checkpoint` must exist regardless.
  Returns:
    The report: {"name", "dataset", "protocol", "step" (0 untrained), "untrained", "checkpoint" (folder or None),
    "test_flip", "rerank" {"enabled", "k1", "k2", "lambda"}, "gallery_sampling" {setting: family},
    "settings" (`protocols.run_protocols`), "published" {setting: quoted rows of docs/published_results.md},
    "config" (dict), "files" {"json", "md"}}.
  Raises:
    FileNotFoundError: no checkpoint (and not allow_untrained), or the requested one does not exist.
  """
  workdir = os.path.abspath(workdir)
  ckpt_workdir, step = resolve_checkpoint(workdir, checkpoint)
  if step is None and not allow_untrained:
    raise _no_checkpoint_error(workdir, checkpoint)
  if jax.process_index() == 0:  # only process 0 writes the reports.
    train.ensure_writable_dir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  run = train.build_run(config, workdir, mesh)
  untrained = step is None
  state = run.init_state() if untrained else _restore(config, run, ckpt_workdir, step)
  model, variables, recalibration = precise_bn.for_evaluation(run.model, train.variables_of(state), config, mesh,
                                                              ckpt_workdir, step, run.source)
  embeddings = evaluator.embed_test_sets(model, variables, run.source, config, mesh)
  settings = protocols.settings_for(run.source, config)
  rerank = rerank_of(config)
  results = score_settings(run.source, embeddings, settings, config, rerank)
  report = {
      "name": config.name, "dataset": config.dataset, "protocol": run.source.protocol,
      "step": 0 if untrained else step, "untrained": untrained, "init": pretrained.init_label(config.model),
      "checkpoint": None if untrained else os.path.join(checkpoints.checkpoint_dir(ckpt_workdir), str(step)),
      "test_flip": bool(config.evals.test_flip),
      "rerank": {"enabled": rerank is not None, "k1": config.evals.rerank_k1, "k2": config.evals.rerank_k2,
                 "lambda": config.evals.rerank_lambda},
      "gallery_sampling": {s.name: s.family for s in settings},
      "settings": results,
      "published": {s.name: published.rows_for(config.dataset, s.name) for s in settings},
      "config": json.loads(config.to_json_best_effort()),
      "embedding": config.evals.embedding, "precise_bn": recalibration,
      "health": evaluator.health_of(model, variables, run.source, embeddings, config,
                                    state.batch_stats if recalibration else None),
  }
  if untrained:
    report["warning"] = UNTRAINED_BANNER
  if jax.process_index() == 0:
    report["files"] = _write(workdir, report)
    print(format_summary(report))
  return report
