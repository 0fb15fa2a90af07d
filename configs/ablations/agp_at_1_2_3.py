"""Full FDNM with AGP after stages 1, 2 and 3.

  python main.py --config=configs/ablations/agp_at_1_2_3.py:regdb --workdir=runs/regdb_agp_at_1_2_3 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_1_2_3", agp_stages=(1, 2, 3), anm_stage=4)
