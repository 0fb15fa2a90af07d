"""Full FDNM with AGP after stage 3 only.

  python main.py --config=configs/ablations/agp_at_3.py:regdb --workdir=runs/regdb_agp_at_3 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_3", agp_stages=(3,), anm_stage=4)
