"""FDNM on LLCM with the paper recipe (FDNM_SPEC.md §3): 288x144, P=6 x K=4, 150 epochs.

  python main.py --config=configs/llcm.py --workdir=runs/llcm --config.data.root=/data/LLCM
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "llcm"
  config.dataset = "llcm"
  config.input.height = 288
  config.input.width = 144
  config.input.erasing_area = (0.02, 0.4)
  return config
