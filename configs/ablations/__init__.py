"""Ablation rows as configs: each file changes a few model/loss fields of a data-set config.

Select the data set after a colon: `--config=configs/ablations/full.py:regdb` (or `:dataset=regdb`);
the default is the synthetic data set. Every other field can still be overridden on the command line.
"""

import importlib

import ml_collections

DATASET_CONFIGS = {"synthetic": "configs.synthetic", "regdb": "configs.regdb", "sysu": "configs.sysu",
                   "llcm": "configs.llcm", "casia_nir_vis": "configs.casia_nir_vis"}


def dataset_config(arg: str | None) -> ml_collections.ConfigDict:
  """The data-set config named by the config-file argument ("regdb" or "dataset=regdb"; None = synthetic)."""
  name = (arg or "synthetic").strip()
  if name.startswith("dataset="):
    name = name[len("dataset="):]
  if name not in DATASET_CONFIGS:
    raise ValueError(f"ablation config argument {arg!r}: use one of {', '.join(DATASET_CONFIGS)} "
                     "(e.g. configs/ablations/full.py:regdb).")
  return importlib.import_module(DATASET_CONFIGS[name]).get_config()


def ablation(arg: str | None, row: str, *, agp_stages=(1, 2), anm_stage=4, cnm_weight=None
             ) -> ml_collections.ConfigDict:
  """A data-set config with the FDNM parts of one ablation row.

  Args:
    arg: the data-set argument (see `dataset_config`).
    row: the row's name; appended to the run name.
    agp_stages: stages followed by AGP (() = no AGP).
    anm_stage: stage followed by ANM (0 = no ANM).
    cnm_weight: weight of the center-guided nuances mining loss; None keeps the data set's (0 without ANM).
  """
  config = dataset_config(arg)
  config.name = f"{config.name}_{row}"
  config.model.agp_stages = tuple(agp_stages)
  config.model.anm_stage = anm_stage
  if cnm_weight is not None:
    config.loss.cnm_weight = cnm_weight
  if anm_stage == 0:
    config.loss.cnm_weight = 0.0
    config.loss.ortho_weight = 0.0
  return config
