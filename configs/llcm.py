"""FDNM on LLCM with the authors' recipe at 384 x 144 (DEEN's input size; the spec's 288 x 144 by override).

Input: 384 x 144 (config.input.height/width), DEEN's recipe (ZYK100/LLCM DEEN/train.py --img_h 384 --img_w 144; its
data loaders resize every training and test image to 144 x 384 with PIL's Image.ANTIALIAS = LANCZOS, here
config.input.resize=pil_lanczos), the first author's previous method and the likely template of FDNM's code (the
FDNM paper's own input size is not available here). FDNM_SPEC.md §3's 288 x 144 (AGW's size) stays reachable:
--config.input.height=288. The rest is FDNM_SPEC.md §3: P=6 x K=4, SGD 0.01 / 0.1, 150 epochs,
random erasing area 0.02-0.4.

  python main.py --config=configs/llcm.py --workdir=runs/llcm --config.data.root=/data/LLCM

Or from a prepared TFDS folder (local or gs://; prepare's --data_dir or the version folder it prints;
reading it back needs no builder code):

  python -m input_pipeline.prepare --dataset=llcm --manual_dir=<the download> --data_dir=/data/tfds
  python main.py --config=configs/llcm.py --workdir=runs/llcm --config.data.data_dir=/data/tfds

Model selection: --config.data.num_val_ids=N holds out N training ids; the periodic evaluations
(--config.evals.every_steps) then score them, not the test set (unless --config.evals.select_on_test=True).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "llcm"
  config.dataset = "llcm"
  config.input.height = 384
  config.input.width = 144
  config.input.erasing_area = (0.02, 0.4)
  config.model.require_pretrained = True  # ImageNet init is the recipe: weights path, or "none".
  return config
