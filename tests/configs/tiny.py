"""A seconds-long run of the full pipeline for end-to-end tests: tiny images, tiny FDNM, 4 steps."""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.name = "tiny"
  config.synthetic.num_train_ids = 8
  config.synthetic.num_test_ids = 4
  config.synthetic.images_per_id = 4
  config.synthetic.height = 32
  config.synthetic.width = 16
  config.input.height = 32
  config.input.width = 16
  config.input.pad = 2
  config.input.num_ids_per_batch = 4
  config.input.num_instances = 2
  config.input.eval_batch_size = 16
  config.input.resize = "pil_lanczos"  # the real data sets' resize (configs/synthetic.py's demo uses tf_bilinear).
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 8
  config.optim.head_lr = 0.1  # the tests' figures were set with this (configs/synthetic.py's demo uses 0.5).
  config.schedule.num_epochs = 2
  config.schedule.steps_per_epoch = 2
  config.schedule.warmup_epochs = 1
  config.schedule.decay_epochs = (1,)
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = False
  config.logging.every_steps = 1
  return config
