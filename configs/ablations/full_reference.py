"""Full FDNM under the reference reading of the paper and its public code (run_config.REFERENCE_READING): ANM's
BatchNorm one module called once per branch (anm_bn=reference), instance-norm statistics over every bin
(anm_inorm_stats=instance), the exact phase of every bin however small (phase_guard=exact), the real FFT's
Hermitian-paired bins treated apart (conjugate_pairs=False), arctan2's reading of a bin on AGP's cut
(phase_cut=arctan2), L_cnm's original the raw pooled map (cnm_original=raw).
The `full` row is the same model with the defaults (configs/default.py).

  python main.py --config=configs/ablations/full_reference.py:regdb --workdir=runs/regdb_full_reference ...
"""

from configs.ablations import ablation
from fdnm_jax.run_config import REFERENCE_READING


def get_config(arg=None):
  config = ablation(arg, "full_reference", agp_stages=(1, 2), anm_stage=4)
  config.model.update(REFERENCE_READING)
  return config
