"""The embedded default: a generated visible/infrared data set and a tiny FDNM, trained on a CPU in minutes.

  python main.py --config=configs/synthetic.py --workdir=runs/synthetic
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "synthetic"
  config.dataset = "synthetic"
  # Many identities, few images each: generalising to unseen test identities needs identity variety.
  config.synthetic.num_train_ids = 300
  config.synthetic.images_per_id = 6
  config.input.height = 64
  config.input.width = 32
  config.input.pad = 4
  config.input.num_ids_per_batch = 8
  config.input.num_instances = 4
  config.input.random_erasing = 0.0
  config.input.eval_batch_size = 128
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.optim.base_lr = 0.1  # trained from scratch (no ImageNet weights): a larger backbone lr than the paper's 0.01.
  config.schedule.num_epochs = 30
  config.schedule.warmup_epochs = 3
  config.schedule.decay_epochs = (20, 27)
  config.checkpoint.every_steps = 100
  config.logging.every_steps = 10
  return config
