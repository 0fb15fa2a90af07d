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
  # Width 8, 16 epochs (912 steps), the classifier/BNNeck at lr 0.5: mAP 57.06 / 55.17 (V->I / I->V; the same
  # digits with XLA_FLAGS=--xla_cpu_max_isa=AVX2), AVX-512 type, 2026-12-05. The issue-17 goal: under 6 minutes on
  # the AVX2-only type with mAP >= 50 both ways. Measured the same day at 16 epochs: backbone lr 0.05 / 0.2 gave
  # 50.2 / 47.5 and 42.1 / 47.6, warm-up 1 with decays (13, 15) 49.2 / 45.7, head lr 0.1 (16 epochs, decays 11
  # and 14, an earlier day) 54.3 / 50.9; 18 epochs 57.8 / 53.9 (no better); 24 epochs with head lr 0.1 72.0 / 70.0
  # in 173 s (docs/benchmarks.md).
  config.model.width = 8
  config.optim.base_lr = 0.1  # trained from scratch (no ImageNet weights): a larger backbone lr than the paper's 0.01.
  # The ID loss sat at ln(300) for ~250 steps with the head at 0.1; at 0.5 the classifier learns from the start.
  config.optim.head_lr = 0.5
  config.schedule.num_epochs = 16
  config.schedule.warmup_epochs = 2
  config.schedule.decay_epochs = (12, 15)
  config.checkpoint.every_steps = 100
  config.logging.every_steps = 10
  return config
