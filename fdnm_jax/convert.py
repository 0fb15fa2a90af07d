"""Converts torchvision-layout ResNet weights to a NumPy `.npz` (so a TPU host needs no torch).

  python -m fdnm_jax.convert --src resnet50-0676ba61.pth --dst resnet50.npz

Reads `.pth`/`.pt` (needs torch), `.safetensors` or `.npz`, checks every key and shape against
the torchvision ResNet (strict, one error listing all problems) and writes the checked tensors
under their torchvision names (`fc.*` and `num_batches_tracked` dropped). Use the result with
`--config.model.pretrained=resnet50.npz`.
"""

import argparse
import os
import sys

import numpy as np

from fdnm_jax import pretrained
from fdnm_jax.errors import FdnmError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fdnm_jax.convert", description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help=".pth / .pt / .safetensors / .npz torchvision-layout state dict")
  parser.add_argument("--dst", required=True, help="output .npz")
  parser.add_argument("--stage_sizes", default="3,4,6,3", help="Bottleneck blocks per stage (ResNet-50: 3,4,6,3)")
  parser.add_argument("--width", type=int, default=64, help="stem / first-stage width (ResNet-50: 64)")
  args = parser.parse_args(argv)
  stage_sizes = tuple(int(s) for s in args.stage_sizes.split(","))
  if not args.dst.endswith(".npz"):
    parser.error(f"--dst {args.dst!r}: expected a .npz path")
  try:
    state = pretrained.load_state_dict(args.src)
    pretrained.convert(state, source=args.src, stage_sizes=stage_sizes, width=args.width)  # validates
  except FdnmError as e:  # the user's input: one line; anything else keeps its traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  keep = pretrained.expected_shapes(stage_sizes, args.width)
  tmp = args.dst + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(state[k], np.float32) for k in keep})
  os.replace(tmp, args.dst)
  print(f"wrote {len(keep)} tensors to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
