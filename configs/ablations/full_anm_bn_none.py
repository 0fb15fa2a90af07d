"""Full FDNM with the defaults except ANM's BatchNorm: no BN after the inverse transform (the second public
reimplementation) (anm_bn=none).

  python main.py --config=configs/ablations/full_anm_bn_none.py:regdb --workdir=runs/regdb_full_anm_bn_none ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_anm_bn_none", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_bn = "none"
  return config
