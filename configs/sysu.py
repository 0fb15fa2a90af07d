"""FDNM on SYSU-MM01 with the paper recipe (FDNM_SPEC.md §3): 288x144, P=6 x K=4, 150 epochs.

  python main.py --config=configs/sysu.py --workdir=runs/sysu --config.data.root=/data/SYSU-MM01
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "sysu"
  config.dataset = "sysu"
  config.input.height = 288
  config.input.width = 144
  config.input.erasing_area = (0.2, 0.8)
  return config
