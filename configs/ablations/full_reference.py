"""Full FDNM under the reference reading of the paper and its public code: ANM's BatchNorm called once per branch
(anm_bn=reference), instance-norm statistics over every bin (anm_inorm_stats=instance), the exact phase of every
bin however small (phase_guard=exact), the real FFT's Hermitian-paired bins treated apart (conjugate_pairs=False),
L_cnm's original the raw pooled map (cnm_original=raw). The `full` row is the same model with the defaults.

  python main.py --config=configs/ablations/full_reference.py:regdb --workdir=runs/regdb_full_reference ...
"""

from configs.ablations import ablation


def get_config(arg=None):
  config = ablation(arg, "full_reference", agp_stages=(1, 2), anm_stage=4)
  config.model.anm_bn = "reference"
  config.model.anm_inorm_stats = "instance"
  config.model.phase_guard = "exact"
  config.model.conjugate_pairs = False
  config.model.cnm_original = "raw"
  return config
