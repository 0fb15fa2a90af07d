"""Full FDNM: AGP after stages 1 and 2, ANM after stage 4, L_cnm.

  python main.py --config=configs/ablations/full.py:regdb --workdir=runs/regdb_full --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "full", agp_stages=(1, 2), anm_stage=4)
