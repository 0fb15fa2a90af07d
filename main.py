"""fdnm-jax entry point: train and evaluate FDNM for visible-infrared person re-identification.

  python main.py --config=configs/synthetic.py --workdir=runs/synthetic
  python main.py --config=configs/regdb.py --workdir=runs/regdb --config.data.root=/data/RegDB
  python main.py --mode=eval --workdir=runs/synthetic [--checkpoint=STEP] [--config=... evaluation overrides]
  python main.py --mode=extract --workdir=runs/synthetic --images=DIR_OR_LIST --modality=infrared --out=feats/
  python main.py --mode=visualize --workdir=runs/synthetic [--queries=6] [--compare_workdir=runs/baseline]

Config fields are overridden on the command line (`--config.optim.base_lr=0.02`); the config
is locked, so a misspelt field is an error, not a silent no-op.
"""

import os
import sys

# The pipeline uses TensorFlow only on the CPU: keep it off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
flags.mark_flags_as_required(["workdir"])  # --config too, except for extract/visualize (default: <workdir>/config.json).

def _hide_accelerators_from_tf() -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")


def _quiet_library_info_logs() -> None:
  """Drops orbax's per-file INFO lines (dozens per checkpoint); warnings and errors still show."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING or "/orbax/" not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.mode == "train" and FLAGS.checkpoint is not None:
    raise app.UsageError("--checkpoint applies to --mode=eval, extract and visualize only")
  if FLAGS.mode != "eval" and FLAGS.allow_untrained:
    raise app.UsageError("--allow_untrained applies to --mode=eval only")
  if FLAGS.config is None and FLAGS.mode == "train":  # eval/extract/visualize default to <workdir>/config.json.
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config (a configs/*.py file)")
  if FLAGS.mode == "extract" and not (FLAGS.images and FLAGS.modality and FLAGS.out):
    raise app.UsageError("--mode=extract needs --images, --modality (visible|infrared) and --out")
  _quiet_library_info_logs()
  from fdnm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_xla_flags()  # CPU-only XLA flags (docs/benchmarks.md); before any JAX backend starts.
  from fdnm_jax import distributed  # pylint: disable=g-import-not-at-top
  from fdnm_jax.errors import FdnmError  # pylint: disable=g-import-not-at-top
  try:  # before anything touches the devices.
    distributed.maybe_initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except FdnmError as e:
    raise app.UsageError(str(e))
  _hide_accelerators_from_tf()
  from fdnm_jax import train  # pylint: disable=g-import-not-at-top  (after TF is configured)

  config = FLAGS.config
  logging.info("Config:\n%s", config)
  try:
    if FLAGS.mode == "train":
      report = train.train_and_evaluate(config, FLAGS.workdir)
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
    logging.error("%s: %s", e.__class__.__name__, e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
