"""Prepares a downloaded data set as a TFDS folder that config.data.data_dir can read.

  python -m input_pipeline.prepare --dataset=sysu_mm01 --manual_dir=/data/SYSU-MM01 --data_dir=/data/tfds
  python -m input_pipeline.prepare --dataset=regdb --manual_dir=/data/RegDB --data_dir=gs://bucket/tfds --splits=1,2
  python -m input_pipeline.prepare --dataset=llcm --manual_dir=/data/LLCM --data_dir=/data/tfds [--skip_corrupt]
  python -m input_pipeline.prepare --dataset=casia_nir_vis --manual_dir=/data/NIR-VIS-2.0 --data_dir=/data/tfds --splits=1

Steps: (1) validate the layout with the data set's reader (the first missing folder or file is named, with the
expected tree); (2) count identities and images and compare them with the published counts (differences are
reported, not fatal: a partial download still builds); (3) build, decoding every image once: a corrupt, truncated
or empty image stops the build naming its path, unless --skip_corrupt (then it is left out and counted); a build
that stops leaves no empty folders behind under --data_dir.
Prints the folder to pass as --config.data.data_dir. Exit status: 0 built, 1 layout / corrupt-image error.
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from fdnm_jax.errors import FdnmError
from input_pipeline.datasets import casia_builder, tfds_builders

# --dataset -> builder class (every subclass of tfds_builders.ReIdBuilder that has a prepare entry).
BUILDERS = {**tfds_builders.BUILDERS, "casia_nir_vis": casia_builder.CasiaNirVis}


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m input_pipeline.prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS),
                      help="the data set to prepare")
  parser.add_argument("--manual_dir", required=True, help="the folder of the data set as downloaded")
  parser.add_argument("--data_dir", required=True, help="where the TFDS folder is written (local path or gs://)")
  parser.add_argument("--splits", default="1,2,3,4,5,6,7,8,9,10",
                      help="RegDB (split_<t>) / CASIA NIR-VIS (fold_<t>): comma-separated numbers to prepare, one "
                      "builder config each")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="leave out (and count) unreadable images instead of stopping")
  return parser.parse_args(argv)


def prepare(dataset: str, manual_dir: str, data_dir: str, splits: Sequence[int] = (1,),
            skip_corrupt: bool = False, out=None) -> list[str]:
  """Validates, counts and builds; returns the prepared folders (one per RegDB split, else one).

  Raises:
    FileNotFoundError: a missing folder / file of the layout (named, with the expected tree).
    ValueError: a malformed list or id file (named).
    tfds_builders.CorruptImageError: an unreadable image (named), without skip_corrupt.
  """
  out = out or sys.stdout
  cls = BUILDERS[dataset]
  prefix = cls.BUILDER_CONFIGS[0].name.rsplit("_", 1)[0] if cls.BUILDER_CONFIGS else None
  configs = [f"{prefix}_{int(t)}" for t in splits] if prefix else [None]
  folders = []
  for config in configs:
    builder = cls(data_dir=data_dir, config=config, skip_corrupt=skip_corrupt)
    what = dataset + (f" {config}" if config else "")
    output = builder.read(manual_dir)  # (1) layout: raises naming the first missing path.
    counts = output.metadata.get("counts", {})
    print(f"{what}: layout of {manual_dir} OK; counts: "
          + ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items())), file=out)
    differences = output.metadata.get("published_differences")
    for line in differences or ():
      print(f"  differs from the published count: {line}", file=out)
    if differences == []:
      print("  all counts match the published ones.", file=out)
    if dataset == "sysu_mm01":
      print("  official gallery permutations exp/rand_perm_cam.mat: "
            + ("found" if output.metadata.get("rand_perm_cam") else "absent (only seeded gallery sampling)"),
            file=out)
    before = _folders(data_dir)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except BaseException:
      _remove_new_empty_folders(data_dir, before)
      raise
    if builder.skipped:
      print(f"  skipped {len(builder.skipped)} corrupt image(s) (--skip_corrupt), e.g. {builder.skipped[:5]}",
            file=out)
    print(f"  prepared: --config.data.data_dir={builder.data_path}", file=out)
    folders.append(str(builder.data_path))
  return folders


_FOLDER_DEPTH = 4  # data_dir/<data set>/<config>/<version>: the folders tfds makes (and downloads/extracted).


def _folders(data_dir: str) -> set[str]:
  """The folders under a local `data_dir` (itself included) down to _FOLDER_DEPTH levels; empty for gs://."""
  if "://" in data_dir:
    return set()
  root = os.path.abspath(data_dir)
  found = set()
  if not os.path.isdir(root):
    return found
  level = [root]
  for _ in range(_FOLDER_DEPTH + 1):
    found.update(level)
    level = [e.path for d in level for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
  return found


def _remove_new_empty_folders(data_dir: str, before: set[str]) -> None:
  """After a failed build: removes the empty folders the build made under `data_dir` (and `data_dir` itself when
  the build made it), deepest first; folders that existed before, or hold anything, stay."""
  if "://" in data_dir:
    return
  root = os.path.abspath(data_dir)
  made = sorted((_folders(data_dir) | ({root} if os.path.isdir(root) else set())) - before,
                key=lambda p: p.count(os.sep), reverse=True)
  for folder in made:
    try:
      os.rmdir(folder)  # only succeeds on an empty folder.
    except OSError:
      pass


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parse(argv)
  logging.getLogger("absl").setLevel(logging.WARNING)
  splits = [int(t) for t in args.splits.split(",") if t.strip()]
  try:
    prepare(args.dataset, args.manual_dir, args.data_dir, splits, args.skip_corrupt)
  except FdnmError as e:  # the user's input: one line; anything else keeps its traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
