"""docs/published_results.md and its parser: the quoted numbers are the sources' (hand-copied here), every row has a
source, and the eval report's section shows the rows of its settings only, labelled quoted."""

import pytest

from fdnm_jax import eval_mode
from fdnm_jax.evaluation import published

HEADER = "| " + " | ".join(published.COLUMNS) + " |\n|---|---|---|---|---|---|---|---|\n"


def test_the_file_quotes_the_readme_numbers_of_agw_and_caj():
  rows = published.load()
  got = {(r["dataset"], r["setting"], r["method"]): (r["Rank-1"], r["mAP"], r["mINP"]) for r in rows}
  # Hand-copied from the READMEs of mangye16/Cross-Modal-Re-ID-baseline (AGW) and its ICCV21_CAJ folder.
  assert got[("sysu", "all_search_single_shot", "AGW")] == ("47.50", "47.65", "35.30")
  assert got[("regdb", "visible_to_infrared", "AGW")] == ("70.05", "66.37", "50.19")
  assert got[("sysu", "all_search_single_shot", "CAJ")] == ("69.88", "66.89", "53.61")
  assert got[("regdb", "visible_to_infrared", "CAJ")] == ("85.03", "79.14", "65.33")
  assert "abstract" in [r for r in rows if r["method"] == "FDNM"][0]["source"]
  assert all(r["source"] not in ("", "-") for r in rows)
  assert all(r["dataset"] in ("sysu", "regdb", "llcm") for r in rows)


def test_rows_for_a_setting_include_wildcard_rows_only_of_that_dataset():
  rows = published.parse(HEADER + "| llcm | * | A | 1.5 | 2 | - | s1 | n |\n"
                         "| llcm | visible_to_infrared | B | 3 | 4 | 5 | s2 | |\n"
                         "| sysu | * | C | 6 | 7 | 8 | s3 | |\n\nafter the table\n")
  assert [r["method"] for r in published.rows_for("llcm", "visible_to_infrared", rows)] == ["A", "B"]
  assert [r["method"] for r in published.rows_for("llcm", "infrared_to_visible", rows)] == ["A"]
  assert published.rows_for("synthetic", "visible_to_infrared", rows) == []
  assert published.value("1.5") == 1.5 and published.value("-") is None
  assert published.value("+5.2 over the runner-up") is None


def test_parse_errors_name_the_line():
  with pytest.raises(ValueError, match=r"x.md: no table with the header"):
    published.parse("| a | b |\n|---|---|\n", "x.md")
  with pytest.raises(ValueError, match=r"x.md:3: 3 cells, expected 8"):
    published.parse(HEADER + "| a | b | c |\n", "x.md")
  with pytest.raises(ValueError, match=r"x.md:3: the row of M has no source"):
    published.parse(HEADER + "| sysu | * | M | 1 | 2 | 3 | - | |\n", "x.md")


def _report(dataset, settings):
  result = {"mean": {"rank1": 50.0, "mAP": 40.0}, "std": {"rank1": 0.0, "mAP": 0.0}, "trials": [1]}
  return {"name": "r", "dataset": dataset, "protocol": "regdb", "step": 7, "untrained": False, "checkpoint": "c",
          "test_flip": False, "rerank": {"enabled": False}, "settings": {s: result for s in settings}}


def test_eval_summary_puts_quoted_rows_under_our_table():
  md = eval_mode.format_summary(_report("regdb", ["visible_to_infrared", "infrared_to_visible"]))
  ours, quoted = md.split("## Published (quoted, not measured)")
  assert "| visible_to_infrared | 1 | 50.00 | 40.00 |" in ours and "AGW" not in ours
  assert "| visible_to_infrared | AGW (quoted) | 70.05 | 66.37 | 50.19 |" in quoted
  assert "| visible_to_infrared | CAJ (quoted) | 85.03 | 79.14 | 65.33 |" in quoted
  assert "infrared_to_visible |" not in quoted  # no quoted number for that direction.
  md = eval_mode.format_summary(_report("synthetic", ["visible_to_infrared"]))
  assert "No published numbers are recorded for synthetic" in md
