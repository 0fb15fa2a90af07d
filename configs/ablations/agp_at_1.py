"""Full FDNM with AGP after stage 1 only.

  python main.py --config=configs/ablations/agp_at_1.py:regdb --workdir=runs/regdb_agp_at_1 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_1", agp_stages=(1,), anm_stage=4)
