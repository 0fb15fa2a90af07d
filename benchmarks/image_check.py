"""Cost of the start-of-run image header check (input_pipeline/image_check.py) on a folder of JPEGs.

  python benchmarks/image_check.py [--num_images=10000] [--height=288] [--width=144] [--dir=/tmp/fdnm_image_check]

Writes `num_images` JPEGs (random noise, quality 90, the size of a SYSU-MM01 crop resized to the paper's input),
then times `image_check.check_files` with its thread pool and in one thread, and a full decode (`tf.io.decode_image`,
what the pipeline and `prepare` run) of a sample for comparison. The files stay in the page cache after writing, so
the figures are for a warm cache: a cold disk or a network file system adds its read latency (which the threads
overlap). Prints one line per measurement.
"""

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline import image_check  # noqa: E402


def write_images(folder: str, n: int, height: int, width: int) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  paths = []
  for i in range(n):
    path = os.path.join(folder, f"{i // 1000:03d}", f"{i:06d}.jpg")
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
    paths.append(path)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=10000)
  parser.add_argument("--height", type=int, default=288)
  parser.add_argument("--width", type=int, default=144)
  parser.add_argument("--dir", default="/tmp/fdnm_image_check")
  parser.add_argument("--decode_sample", type=int, default=1000)
  args = parser.parse_args()
  paths = write_images(args.dir, args.num_images, args.height, args.width)
  size = os.path.getsize(paths[0])
  print(f"{len(paths):,} JPEGs of {args.height} x {args.width}, {size:,} bytes each, under {args.dir}")
  for threads in (16, 1):
    summary = image_check.check_files(paths, threads=threads)
    assert not summary.corrupt
    print(f"header check, {threads:2d} thread(s): {summary.seconds:.2f} s "
          f"({summary.seconds / len(paths) * 1e6:.0f} us per image)")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sample = paths[:args.decode_sample]
  start = time.perf_counter()
  for p in sample:
    with open(p, "rb") as f:
      tf.io.decode_image(f.read(), channels=3, expand_animations=False)
  per = (time.perf_counter() - start) / len(sample)
  print(f"full decode (tf.io.decode_image), 1 thread: {per * 1e6:.0f} us per image, "
        f"{per * len(paths):.1f} s for all {len(paths):,}")


if __name__ == "__main__":
  main()
