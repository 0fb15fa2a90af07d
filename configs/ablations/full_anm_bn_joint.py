"""Full FDNM with the defaults except ANM's BatchNorm: one BN called once on the branches' batch-concatenation, one set
of statistics in training and at test (as the BNNeck and DEEN) (anm_bn=joint).

  python main.py --config=configs/ablations/full_anm_bn_joint.py:regdb --workdir=runs/regdb_full_anm_bn_joint ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_anm_bn_joint", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_bn = "joint"
  return config
