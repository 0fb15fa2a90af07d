"""FDNM on CASIA NIR-VIS 2.0 (visible-infrared face recognition), View 2 fold config.data.fold.

  python main.py --config=configs/casia_nir_vis.py --workdir=runs/casia_f1 --config.data.root=/data/NIR-VIS-2.0 \\
      --config.data.fold=1
  python -m fdnm_jax.evaluation.face runs/casia_f*/results/casia_nir_vis.json   # mean +- std over the fold runs

The full FDNM model (AGP after stages 1 and 2, ANM after stage 4, L_cnm) through the same two-stream network: the
VIS images go through the visible stem, the NIR images through the infrared stem. Evaluation: the face protocol
(`fdnm_jax.evaluation.face`): NIR probes against the VIS gallery, Rank-1 and VR@FAR = 1 % / 0.1 %.

Recipe: the paper validates FDNM on CASIA NIR-VIS 2.0, but its face recipe (input size included) is not available
here (only its abstract and a summary, which say no more), and DEEN, whose code the ReID configs follow, has no face
experiment. So this is not the authors' recipe; chosen here (each a field to override):
  - input 128 x 128 (config.input.height/width; the size of the cropped copies the data set ships and that
    LightCNN-style face code uses; 112 x 112 also works), resized as the ReID configs do (PIL LANCZOS,
    config.input.resize; the shipped 128 x 128 crops pass unchanged), pad-and-crop of 8 pixels (about the ReID
    recipe's 10 at 288 x 144, scaled to the smaller image);
  - everything else as the ReID recipe (FDNM_SPEC.md §3): P = 6 subjects x K = 4 images per modality, SGD
    0.01 / 0.1 with warm-up and decay at epochs 20 and 80, 150 epochs, flip, random grayscale and erasing;
  - the images are read as the lists name them (the full frames); config.data.modality_folder_suffix="_128x128"
    reads the cropped copies of the same names instead (stephenkung/NIR_VIS_Face_Recognition reads those);
  - one run per fold: the standard 10-fold mean +- std combines ten runs (the command above).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.name = "casia_nir_vis"
  config.dataset = "casia_nir_vis"
  config.data.fold = 1
  config.input.height = 128
  config.input.width = 128
  config.input.pad = 8
  config.input.erasing_area = (0.02, 0.4)
  config.model.agp_stages = (1, 2)
  config.model.anm_stage = 4
  config.loss.cnm_weight = 0.8
  config.model.require_pretrained = True  # ImageNet init is the recipe: weights path, or "none".
  return config
