"""Full FDNM with the defaults except L_cnm's original: the pooled map standardized over the batch, in the nuance
features' space (cnm_original=batch_standardized), instead of the raw pooled map.

  python main.py --config=configs/ablations/full_cnm_standardized.py:regdb --workdir=runs/regdb_full_cnm_std ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_cnm_standardized", agp_stages=(1, 2), anm_stage=4)
  config.model.cnm_original = "batch_standardized"
  return config
