"""Full FDNM with the defaults except ANM's instance-norm statistics: mean and variance over the non-DC bins of the
amplitude grid, applied to all (anm_inorm_stats=exclude_dc), instead of over every bin.

  python main.py --config=configs/ablations/full_inorm_exclude_dc.py:regdb --workdir=runs/regdb_full_inorm_dc ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_inorm_exclude_dc", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_inorm_stats = "exclude_dc"
  return config
