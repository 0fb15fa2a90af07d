"""Train-stream throughput (images/s, both modalities counted) of input_pipeline.pipeline.train_batches.

Default: the paper's batch of P=6 identities x (K=4 visible + 4 infrared) = 48 images, resized to 384 x 144, every
augmentation on (pad-and-crop, flip, grayscale, erasing; --channel_aug adds CAJ's), read two ways from a generated
set in RegDB's layout (stored images of --stored_height x --stored_width BMP files, about the size of real RegDB /
SYSU-MM01 crops):
  files:    config.data.root (each image read from its file and decoded);
  prepared: config.data.data_dir (the same set built with the TFDS builder; bytes from memory).
The first --warmup batches (tf.data start-up) are not timed. The machine load average is printed: on a shared
machine the numbers move with it.

  python benchmarks/input_pipeline.py                       # 384x144, 6 x (4+4), 50 timed batches
  python benchmarks/input_pipeline.py --root=/data/RegDB    # a real RegDB download instead (split 1)
  python benchmarks/input_pipeline.py --height=64 --width=32 --ids=8 --stored_height=96 --stored_width=48 \
      --modes=files --batches=200        # the README demo's batch (configs/synthetic.py)
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # pylint: disable=g-import-not-at-top
from input_pipeline import pipeline, prepare, sources
from input_pipeline.datasets import synthetic


def _time(visible, infrared, input_config, warmup: int, batches: int) -> float:
  stream = pipeline.train_batches(visible, infrared, input_config, seed=0)
  for _ in range(warmup):
    next(stream)
  start = time.perf_counter()
  n = 0
  for _ in range(batches):
    batch = next(stream)
    n += len(batch["visible"]) + len(batch["infrared"])
  return n / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=144)
  parser.add_argument("--ids", type=int, default=6, help="P")
  parser.add_argument("--instances", type=int, default=4, help="K")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--stored_height", type=int, default=256)
  parser.add_argument("--stored_width", type=int, default=128)
  parser.add_argument("--channel_aug", action="store_true")
  parser.add_argument("--root", default="", help="a RegDB download to read instead of the generated set")
  parser.add_argument("--modes", default="files,prepared")
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="bench_input_")
  root = args.root or synthetic.generate(
      os.path.join(work, "RegDB"), num_train_ids=32, num_test_ids=2, images_per_id=10, num_cameras=1,
      height=args.stored_height, width=args.stored_width, seed=0)
  config = default.get_config()
  config.dataset = "regdb"
  c = config.input
  c.height, c.width, c.num_ids_per_batch, c.num_instances = args.height, args.width, args.ids, args.instances
  c.channel_aug = args.channel_aug
  print(f"load average before: {os.getloadavg()}, cpus: {os.cpu_count()}")
  print(f"batch {args.ids} ids x ({args.instances}+{args.instances}) = {2 * args.ids * args.instances} images at "
        f"{args.height}x{args.width}; stored {'(real)' if args.root else f'{args.stored_height}x{args.stored_width}'}")
  for mode in args.modes.split(","):
    if mode == "files":
      config.data.root, config.data.data_dir = root, ""
    else:
      (folder,) = prepare.prepare("regdb", root, os.path.join(work, "tfds"), splits=(1,), out=open(os.devnull, "w"))
      config.data.root, config.data.data_dir = "", folder
    source = sources.load_source(config, work)
    cpu = time.process_time()
    rate = _time(source.train_visible, source.train_infrared, c, args.warmup, args.batches)
    cpu = (time.process_time() - cpu) / (args.warmup + args.batches)
    print(f"{mode:9s}: {rate:8.1f} images/s  ({rate / (2 * args.ids * args.instances):.2f} batches/s; "
          f"{1000 * cpu:.1f} ms CPU per batch, stream set-up included)")
  print(f"load average after: {os.getloadavg()}")
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
