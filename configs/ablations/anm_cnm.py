"""+ANM+L_cnm: ANM after stage 4 with the center-guided nuances mining loss; no AGP.

  python main.py --config=configs/ablations/anm_cnm.py:regdb --workdir=runs/regdb_anm_cnm --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "anm_cnm", agp_stages=(), anm_stage=4)
