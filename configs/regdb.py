"""FDNM on RegDB with the paper recipe (FDNM_SPEC.md §3): 288x144, P=6 x K=4, 150 epochs.

  python main.py --config=configs/regdb.py --workdir=runs/regdb --config.data.root=/data/RegDB --config.data.trial=1
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "regdb"
  config.dataset = "regdb"
  config.input.height = 288
  config.input.width = 144
  config.input.erasing_area = (0.02, 0.4)
  return config
