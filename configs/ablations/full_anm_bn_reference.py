"""Full FDNM with the defaults except ANM's BatchNorm: one BN module called once per branch, per-branch batch
statistics in training, one running average updated by both (the PyTorch code) (anm_bn=reference).

  python main.py --config=configs/ablations/full_anm_bn_reference.py:regdb --workdir=runs/regdb_full_anm_bn_reference ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_anm_bn_reference", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_bn = "reference"
  return config
