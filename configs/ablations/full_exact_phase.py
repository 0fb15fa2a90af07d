"""Full FDNM with the defaults except AGP's and ANM's phase: the exact phase of every bin however small
(phase_guard=exact) and the real FFT's Hermitian-paired bins treated apart (conjugate_pairs=False).

  python main.py --config=configs/ablations/full_exact_phase.py:regdb --workdir=runs/regdb_full_exact_phase ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_exact_phase", agp_stages=(1, 2), anm_stage=4)
  config.model.phase_guard = "exact"
  config.model.conjugate_pairs = False
  return config
