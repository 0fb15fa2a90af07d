"""fdnm-jax entry point: train and evaluate FDNM for visible-infrared person re-identification.

  python main.py --config=configs/synthetic.py --workdir=runs/synthetic
  python main.py --config=configs/regdb.py --workdir=runs/regdb --config.data.root=/data/RegDB \\
      --config.model.pretrained=/data/resnet50.npz
  python main.py --mode=eval --workdir=runs/synthetic [--checkpoint=STEP] [--config=... evaluation overrides]
  python main.py --mode=extract --workdir=runs/synthetic --images=DIR_OR_LIST --modality=infrared --out=feats/
  python main.py --mode=visualize --workdir=runs/synthetic [--queries=6] [--compare_workdir=runs/baseline]

Config fields are overridden on the command line (`--config.optim.base_lr=0.02`); the config is locked, so a
misspelt field is an error, not a silent no-op. The whole config is validated, and compared with the workdir's
stored one (a workdir is one run, `fdnm_jax/run_config.py`), before JAX is imported or anything is written.

Every mistake of the user's (a flag, the config file, a config field, the workdir, the data) ends in one line,
`error: <what is wrong and the fix>`, exit status 1; any other exception is an internal error and keeps its
traceback. `--help` prints the flags and exits 0.
"""

import difflib
import os
import re
import sys
from typing import Optional

# The pipeline uses TensorFlow only on the CPU: keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# First, before the allocations it governs: malloc keeps the buffers each step frees (fdnm_jax/host_malloc.py).
from fdnm_jax import host_malloc  # noqa: E402
host_malloc.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path of a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, results and the config.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "extract", "visualize"],
                  "train: train (resuming from the workdir) and evaluate at the end. eval: evaluate a checkpoint "
                  "under every protocol setting of the data set (report in <workdir>/results/eval_*.json, .md). "
                  "extract: embed --images with the workdir's model (<out>/features.npy, index.tsv). visualize: "
                  "rank lists, distance histograms and t-SNE PNGs in <workdir>/visualize/.")
flags.DEFINE_bool("allow_config_change", False, "--mode=train on a workdir whose config.json differs in fields that "
                  "change the trained model or its batches: continue the run under the new values from its latest "
                  "checkpoint, recorded as a new segment in <workdir>/config_history.jsonl (config.json keeps the "
                  "original). Without it such a command stops and lists the fields.")
flags.DEFINE_string("checkpoint", None, "--mode=eval|extract|visualize: a step number of <workdir>/checkpoints, or a folder "
                    "<workdir>/checkpoints/<step>; default: the latest step.")
flags.DEFINE_bool("allow_untrained", False, "--mode=eval: with no checkpoint, evaluate the randomly initialised "
                  "model (reports marked UNTRAINED) instead of stopping with an error.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() (JAX detects TPU pods and "
                  "SLURM; or give --coordinator_address, --num_processes, --process_id). Or FDNM_DISTRIBUTED=1.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (or FDNM_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or FDNM_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (or FDNM_PROCESS_ID).")
flags.DEFINE_string("images", None, "--mode=extract: a folder of images (recursive) or a text list of paths.")
flags.DEFINE_enum("modality", None, ["visible", "infrared"], "--mode=extract: which stem embeds the images.")
flags.DEFINE_string("out", None, "--mode=extract: output folder for features.npy and index.tsv.")
flags.DEFINE_string("queries", "4", "--mode=visualize: n queries evenly spaced, or positions '0,17,42'.")
flags.DEFINE_string("compare_workdir", None, "--mode=visualize: a second run whose distance histograms go beside.")

HELP_FLAGS = ("help", "helpshort", "helpfull", "h", "?")


def _fail(message: str) -> None:
  """Ends the program with one line on stderr and exit status 1 (a user's mistake)."""
  sys.exit("error: " + " ".join(line.strip() for line in str(message).splitlines() if line.strip()))


def _config_file_arg(args: list[str]) -> Optional[str]:
  """The path given to --config (without a ':argument' suffix), or None."""
  for i, a in enumerate(args):
    if a.startswith("--config="):
      value = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      value = args[i + 1]
    else:
      continue
    return value.split(":", 1)[0] if not os.path.isfile(value) else value
  return None


def _unknown_override(args: list[str], key_error: str) -> str:
  """The message for an override of a field the config lacks (`key_error`: the missing key as config_flags says)."""
  from fdnm_jax import run_config  # pylint: disable=g-import-not-at-top  (no JAX: run_config is light)
  name = key_error.strip("'\"").split("\n")[0].strip("'\"")
  override = next((a.split("=", 1)[0] for a in args if a.startswith("--config.")
                   and name in a.split("=", 1)[0][len("--config."):].split(".")), None)
  field = override[len("--config."):] if override else name
  close = difflib.get_close_matches(field, run_config.known_fields(), n=1)
  hint = f" (did you mean --config.{close[0]}?)" if close else ""
  return (f"--config.{field}: the config has no field {field}{hint}; configs/default.py lists every field, "
          "python main.py --helpfull lists the overrides.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with `--help` exiting 0 and every mistake in the flags or in the config file (missing,
  broken, a misspelt override) ending in one line."""
  args = argv[1:]
  asked = [a.lstrip("-").split("=", 1)[0] for a in args if a.startswith("-")]
  if any(a in HELP_FLAGS for a in asked):
    app.usage(shorthelp="helpfull" not in asked, writeto_stdout=True, exitcode=0)
  path = _config_file_arg(args)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type (absl's message names it).
    text = str(e)
    if path and "Error whilst parsing config file" in text:  # config_flags keeps the file's error as text.
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      where = re.findall(r'File "([^"]+)", line (\d+)', text)
      line = next((n for f, n in reversed(where) if os.path.abspath(f) == os.path.abspath(path)), "?")
      _fail(f"config file {path}, line {line}: {lines[-1]}. Fix the file.")
    _fail(f"{text}. python main.py --help lists the flags.")
  except SyntaxError as e:
    _fail(f"config file {e.filename}, line {e.lineno}: {e.msg}: {(e.text or '').strip()!r}. Fix the file.")
  except Exception as e:  # pylint: disable=broad-except
    line = _line_in(e, path) if path else None
    if line is not None:  # raised by the user's config file itself
      text = " ".join(str(e).split()) if str(e).strip() else ""
      _fail(f"config file {path}, line {line}: {type(e).__name__}: {text}. Fix the file.")
    if isinstance(e, (AttributeError, KeyError)):  # an override of a field (AttributeError) or section (KeyError)
      cause = e.args[0] if isinstance(e, AttributeError) and e.args else e
      _fail(_unknown_override(args, str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)))
    raise
  if path is not None:
    if not os.path.isfile(path):
      _fail(f"config file {path} not found: pass --config=<a config file>, e.g. configs/synthetic.py, "
            "configs/sysu.py, configs/regdb.py, configs/llcm.py, configs/casia_nir_vis.py.")
    try:
      FLAGS.config.keys()  # config_flags keeps a load failure until the config is used.
    except OSError as e:
      _fail(f"config file {path} could not be loaded: {' '.join(str(e).split())}")
  return rest


def _line_in(error: BaseException, path: str) -> Optional[int]:
  """The line of the file `path` (the user's config file) where the traceback of `error` last passes, or None."""
  target = os.path.abspath(path)
  line = None
  tb = error.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  return line


def _hide_accelerators_from_tf() -> None:
  from fdnm_jax import tensorflow_import  # pylint: disable=g-import-not-at-top
  tf = tensorflow_import.load()  # the first import of TensorFlow: without its eager Keras import (1.7 s).
  tf.config.set_visible_devices([], "GPU")


def _quiet_library_info_logs() -> None:
  """Drops orbax's per-file INFO lines (dozens per checkpoint); warnings and errors still show."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname)


def check_command(argv: list[str]):
  """The checks that need no JAX, in the order a user fixes them: the flags, the config's fields, the workdir's
  contract (a resume with other trained fields stops here). Returns the config to run (None: the workdir's)."""
  from fdnm_jax import run_config  # pylint: disable=g-import-not-at-top
  from fdnm_jax.errors import FlagError  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise FlagError(f"unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)")
  if not FLAGS.workdir:
    raise FlagError("--workdir is required: the run's folder (checkpoints, metrics, results, config.json)")
  if FLAGS.mode == "train" and FLAGS.checkpoint is not None:
    raise FlagError("--checkpoint applies to --mode=eval, extract and visualize only")
  if FLAGS.mode != "eval" and FLAGS.allow_untrained:
    raise FlagError("--allow_untrained applies to --mode=eval only")
  if FLAGS.mode != "train" and FLAGS.allow_config_change:
    raise FlagError("--allow_config_change applies to --mode=train only")
  if FLAGS.config is None and FLAGS.mode == "train":  # eval/extract/visualize default to <workdir>/config.json.
    raise FlagError(f"--mode={FLAGS.mode} needs --config (a configs/*.py file)")
  if FLAGS.mode == "extract" and not (FLAGS.images and FLAGS.modality and FLAGS.out):
    raise FlagError("--mode=extract needs --images, --modality (visible|infrared) and --out")
  config = FLAGS.config
  if config is None:
    return None
  if FLAGS.mode == "train":
    fresh = run_config.load_effective(FLAGS.workdir) is None
    run_config.validate(config, fresh=fresh)
    run_config.check_contract(FLAGS.workdir, config, "resume", FLAGS.allow_config_change)
  else:
    run_config.validate(config, fresh=False)  # evaluation restores a checkpoint: the init rule does not apply.
  return config


def main(argv):
  from fdnm_jax.errors import FdnmError  # pylint: disable=g-import-not-at-top  (no JAX)
  try:
    config = check_command(argv)
  except FdnmError as e:
    _fail(str(e))
  _quiet_library_info_logs()
  from fdnm_jax import import_gc  # pylint: disable=g-import-not-at-top
  with import_gc.paused_then_frozen():  # the heavy imports without the GC's passes over them (import_gc).
    from fdnm_jax import platform  # pylint: disable=g-import-not-at-top
    platform.configure_xla_flags()  # CPU-only XLA flags (docs/benchmarks.md); before any JAX backend starts.
    from fdnm_jax import distributed  # pylint: disable=g-import-not-at-top
    try:  # before anything touches the devices.
      distributed.maybe_initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    except FdnmError as e:
      _fail(str(e))
    _hide_accelerators_from_tf()
    from fdnm_jax import train  # pylint: disable=g-import-not-at-top  (after TF is configured)

  if config is not None:
    logging.info("Config:\n%s", config)
  try:
    if FLAGS.mode == "train":
      report = train.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
      print("\n" + train.format_final_report(report))
    elif FLAGS.mode == "eval":
      from fdnm_jax import eval_mode  # pylint: disable=g-import-not-at-top
      eval_mode.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.allow_untrained)
    elif FLAGS.mode == "extract":
      from fdnm_jax import inference  # pylint: disable=g-import-not-at-top
      inference.extract(FLAGS.workdir, FLAGS.images, FLAGS.modality, FLAGS.out, FLAGS.checkpoint, config)
    else:
      from fdnm_jax import visualize  # pylint: disable=g-import-not-at-top
      visualize.visualize(FLAGS.workdir, config, FLAGS.checkpoint, FLAGS.queries, FLAGS.compare_workdir)
  except train.Preempted as e:  # the checkpoint is saved: exit 0 so the scheduler restarts and resumes.
    logging.warning("%s", e)
    sys.exit(0)
  except FdnmError as e:  # the user's input is wrong: one line with the fix. Anything else keeps its traceback.
    _fail(str(e))


if __name__ == "__main__":
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit as done:  # every normal end (0, an error line's 1, --help): skip the interpreter's teardown.
    from fdnm_jax import process_exit  # pylint: disable=g-import-not-at-top
    process_exit.exit_without_teardown(done.code)
