"""FDNM on RegDB with the paper recipe (FDNM_SPEC.md §3): 288x144, P=6 x K=4, 150 epochs.

  python main.py --config=configs/regdb.py --workdir=runs/regdb --config.data.root=/data/RegDB --config.data.trial=1

Or from a prepared TFDS folder (local or gs://; prepare's --data_dir or the version folder it prints;
reading it back needs no builder code):

  python -m input_pipeline.prepare --dataset=regdb --manual_dir=<the download> --data_dir=/data/tfds
  python main.py --config=configs/regdb.py --workdir=runs/regdb --config.data.data_dir=/data/tfds --config.data.trial=1

Model selection: --config.data.num_val_ids=N holds out N training ids; the periodic evaluations
(--config.evals.every_steps) then score them, not the test set (unless --config.evals.select_on_test=True).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "regdb"
  config.dataset = "regdb"
  config.input.height = 288
  config.input.width = 144
  config.input.erasing_area = (0.02, 0.4)
  config.model.require_pretrained = True  # ImageNet init is the recipe: weights path, or "none".
  return config
