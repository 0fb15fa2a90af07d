"""Full FDNM with AGP after stages 1 and 2 (the paper's choice; same model as full).

  python main.py --config=configs/ablations/agp_at_1_2.py:regdb --workdir=runs/regdb_agp_at_1_2 --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp_at_1_2", agp_stages=(1, 2), anm_stage=4)
