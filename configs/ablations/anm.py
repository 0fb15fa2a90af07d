"""+ANM: ANM after stage 4 without the center-guided loss; no AGP.

  python main.py --config=configs/ablations/anm.py:regdb --workdir=runs/regdb_anm --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "anm", agp_stages=(), anm_stage=4, cnm_weight=0.0)
