"""+AGP: AGP after stages 1 and 2; no ANM.

  python main.py --config=configs/ablations/agp.py:regdb --workdir=runs/regdb_agp --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "agp", agp_stages=(1, 2), anm_stage=0)
