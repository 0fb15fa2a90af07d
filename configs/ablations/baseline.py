"""Baseline: two-stream ResNet-50, no AGP, no ANM, no L_cnm.

  python main.py --config=configs/ablations/baseline.py:regdb --workdir=runs/regdb_baseline --config.data.root=...
"""

from configs.ablations import ablation


def get_config(arg=None):
  return ablation(arg, "baseline", agp_stages=(), anm_stage=0)
