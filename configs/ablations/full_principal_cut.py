"""Full FDNM with the defaults except AGP's reading of a bin exactly on the negative real axis: +pi, the principal
value, whatever the sign of its zero imaginary part (phase_cut=principal), instead of arctan2's sign reading.

  python main.py --config=configs/ablations/full_principal_cut.py:regdb --workdir=runs/regdb_full_principal_cut ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_principal_cut", agp_stages=(1, 2), anm_stage=4)
  config.model.phase_cut = "principal"
  return config
