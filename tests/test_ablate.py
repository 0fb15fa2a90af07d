"""The ablation configs and the table of launch/ablate.py (the runs themselves are the slow end-to-end path)."""

import pytest

from configs.ablations import DATASET_CONFIGS
from launch import ablate


@pytest.mark.parametrize("dataset", sorted(DATASET_CONFIGS))
@pytest.mark.parametrize("row", ablate.ALL_ROWS)
def test_every_row_builds_for_every_data_set(row, dataset):
  config = ablate.load_config(row, dataset)
  assert config.dataset == dataset and config.name.endswith(row)
  if row == "baseline":
    assert config.model.agp_stages == () and config.model.anm_stage == 0 and config.loss.cnm_weight == 0.0


def test_rows_differ_from_the_baseline_only_in_their_fdnm_parts():
  base = ablate.load_config("baseline", "regdb")
  diff = ablate.config_diff(ablate.load_config("agp_at_3", "regdb"), base)
  assert set(diff.split(", ")) == {"agp_stages=(3,)", "anm_stage=4", "cnm_weight=0.8"}
  assert ablate.config_diff(ablate.load_config("anm", "regdb"), base) == "anm_stage=4"
  assert ablate.config_diff(base, base) == "—"


def test_unknown_row_and_data_set_are_named():
  with pytest.raises(FileNotFoundError, match="no_such_row"):
    ablate.load_config("no_such_row", "regdb")
  with pytest.raises(ValueError, match="market"):
    ablate.load_config("full", "market")


def test_markdown_table_lists_each_setting_and_row():
  def report(m, step):
    row = {"rank1": m, "rank10": m + 1, "rank20": m + 2, "mAP": m + 3, "mINP": m + 4}
    return {"settings": {"v2i": row, "i2v": row}, "num_params": 1_500_000, "train_step_seconds": step}
  table = ablate.markdown_table([("baseline", report(10.0, 0.25), "—"), ("full", report(20.0, None), "x=1")])
  lines = table.splitlines()
  assert lines[0].startswith("| row | v2i R1 | v2i R10 | v2i R20 | v2i mAP | v2i mINP | i2v R1 |")
  assert lines[2] == ("| baseline | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 10.00 | 11.00 | 12.00 | 13.00 | 14.00 "
                      "| 1.500 | 0.250 | — |")
  assert lines[3].endswith("| 1.500 | — | x=1 |")
