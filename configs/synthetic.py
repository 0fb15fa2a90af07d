"""The embedded default: a generated visible/infrared data set and a tiny FDNM, trained on a CPU in minutes.

  python main.py --config=configs/synthetic.py --workdir=runs/synthetic
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "synthetic"
  config.dataset = "synthetic"
  config.input.height = 64
  config.input.width = 32
  config.input.pad = 4
  config.input.num_ids_per_batch = 8
  config.input.num_instances = 4
  config.input.random_erasing = 0.0
  config.input.eval_batch_size = 128
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.schedule.num_epochs = 30
  config.schedule.warmup_epochs = 3
  config.schedule.decay_epochs = (20, 27)
  config.checkpoint.every_steps = 100
  config.logging.every_steps = 10
  return config
