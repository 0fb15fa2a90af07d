"""Full FDNM with AGP after stage 2 only.

  python main.py --config=configs/ablations/agp_at_2.py:regdb --workdir=runs/regdb_agp_at_2 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_2", agp_stages=(2,), anm_stage=4)
