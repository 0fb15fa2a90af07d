"""Full FDNM with the defaults except ANM's BatchNorm: a BN module per branch (anm_bn=per_branch).

  python main.py --config=configs/ablations/full_anm_bn_per_branch.py:regdb --workdir=runs/regdb_anm_bn_per_branch ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_anm_bn_per_branch", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_bn = "per_branch"
  return config
