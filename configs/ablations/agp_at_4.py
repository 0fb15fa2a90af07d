"""Full FDNM with AGP after stage 4 only.

  python main.py --config=configs/ablations/agp_at_4.py:regdb --workdir=runs/regdb_agp_at_4 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_4", agp_stages=(4,), anm_stage=4)
