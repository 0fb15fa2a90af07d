"""The aggregator of repeated runs: hand-worked means and stds, both report layouts, and its errors."""

import math

import pytest

from fdnm_jax.evaluation import aggregate


def _training_report(rank1, mAP, extra=None):
  row = {"rank1": rank1, "rank5": rank1 + 5, "mAP": mAP, "rank1_std": 0.0, "cmc": [0.1], "num_query": 6, "trials": 1}
  row.update(extra or {})
  return {"name": "regdb", "step": 3, "settings": {"visible_to_infrared": row}}


def test_hand_worked_mean_and_both_stds():
  runs = [aggregate.run_numbers(_training_report(r, m), key) for key, (r, m) in
          {3: (30.0, 12.0), 1: (10.0, 10.0), 2: (20.0, 14.0)}.items()]
  pop = aggregate.aggregate(runs)["visible_to_infrared"]
  assert pop["keys"] == [1, 2, 3] and pop["metrics"] == ["rank1", "rank5", "mAP"]
  # rank1 10, 20, 30: mean 20; squared deviations 100 + 0 + 100 = 200; population 200/3, sample 200/2.
  # Integer-valued runs: every sum and square is exact in float64, so the mean is exact and the std is
  # sqrt(fl(200 / 3)), the same two roundings as the expected side. Compared exactly.
  assert pop["mean"]["rank1"] == 20.0 and pop["std"]["rank1"] == math.sqrt(200 / 3)
  assert pop["mean"]["mAP"] == 12.0 and pop["std"]["mAP"] == math.sqrt(8 / 3)
  assert pop["per_run"][3] == {"rank1": 30.0, "rank5": 35.0, "mAP": 12.0}
  sample = aggregate.aggregate(runs, ddof=1)["visible_to_infrared"]
  assert sample["std"]["rank1"] == 10.0 and sample["std"]["mAP"] == 2.0  # sqrt(100), sqrt(4): exact.
  table = aggregate.format_aggregate({"visible_to_infrared": sample}, key_name="data.trial")
  assert table.splitlines()[0] == ("| setting | data.trial | runs (cells: mean ± sample std (ddof=1)) | Rank-1 | "
                                   "Rank-5 | mAP |")
  assert "| visible_to_infrared | 1,2,3 | 3 | 20.00 ± 10.00 | 25.00 ± 10.00 | 12.00 ± 2.00 |" in table
  rows = aggregate.format_per_run({"visible_to_infrared": pop}, "seed", extra={k: {"step": 3} for k in (1, 2, 3)})
  assert rows.splitlines()[0] == "| setting | seed | step | Rank-1 | Rank-5 | mAP |"
  assert "| visible_to_infrared | 2 | 3 | 20.00 | 25.00 | 14.00 |" in rows


def test_eval_mode_rows_use_their_mean_and_a_metric_missing_from_one_run_is_left_out():
  eval_report = {"name": "x", "rerank": {"enabled": True},
                 "settings": {"visible_to_infrared": {"mean": {"rank1": 40.0, "mAP": 30.0, "mINP": 20.0},
                                                      "std": {"rank1": 9.0}, "per_trial": []}}}
  numbers = aggregate.run_numbers(eval_report, 7)
  assert numbers == {"visible_to_infrared": {7: {"rank1": 40.0, "mAP": 30.0, "mINP": 20.0}}}
  agg = aggregate.aggregate([numbers, aggregate.run_numbers(_training_report(20.0, 10.0), 8)])
  assert agg["visible_to_infrared"]["metrics"] == ["rank1", "mAP"]  # mINP and Rank-5 are not in both.
  assert agg["visible_to_infrared"]["mean"]["rank1"] == 30.0  # (40 + 20) / 2: exact in float64.
  assert aggregate.report_reranked(eval_report) and not aggregate.report_reranked(_training_report(1.0, 1.0))
  one = aggregate.aggregate([numbers], ddof=1)["visible_to_infrared"]
  assert math.isnan(one["std"]["rank1"])  # a sample std of one run is undefined.
  assert "40.00 ± n/a" in aggregate.format_aggregate({"s": one})


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="has no 'settings'"):
    aggregate.run_numbers({"name": "r"}, 1)
  with pytest.raises(ValueError, match="none of rank1"):
    aggregate.run_numbers({"name": "r", "settings": {"s": {"cmc": [1.0]}}}, 1)
  numbers = aggregate.run_numbers(_training_report(1.0, 2.0), 4)
  with pytest.raises(ValueError, match="4 is scored by more than one report"):
    aggregate.aggregate([numbers, numbers])
  with pytest.raises(ValueError, match="no numbers"):
    aggregate.aggregate([])
  with pytest.raises(ValueError, match="ddof=2"):
    aggregate.aggregate([numbers], ddof=2)
