"""docs/published_results.md and its parser: the quoted numbers are the sources' (hand-copied here), every row has a
source and a re-ranking label, and the reports' section shows the rows of their settings only, labelled quoted, with
re-ranked rows apart from the others."""

import pytest

from fdnm_jax import eval_mode
from fdnm_jax.evaluation import published

HEADER = "| " + " | ".join(published.COLUMNS) + " |\n|" + "---|" * len(published.COLUMNS) + "\n"
SYSU_ALL, SYSU_INDOOR = "all_search_single_shot", "indoor_search_single_shot"
V2I, I2V = "visible_to_infrared", "infrared_to_visible"

# Hand-copied from issue 16 (R1 / mAP; SYSU all, SYSU indoor, RegDB V->I, RegDB I->V) and the READMEs of
# mangye16/Cross-Modal-Re-ID-baseline (AGW, CAJ: R1 / mAP / mINP), with the re-ranking each source states.
EXPECTED = {
    ("sysu", SYSU_ALL, "AGW"): ("47.50", "47.65", "35.30", "no"),
    ("regdb", V2I, "AGW"): ("70.05", "66.37", "50.19", "no"),
    ("sysu", SYSU_ALL, "CAJ"): ("69.88", "66.89", "53.61", "no"),
    ("regdb", V2I, "CAJ"): ("85.03", "79.14", "65.33", "no"),
}
FOUR = {  # method: ((sysu all), (sysu indoor), (regdb V->I), (regdb I->V)), re-ranked
    "DEEN": ((("74.70", "71.80"), ("80.30", "83.30"), ("91.10", "85.10"), ("89.50", "83.40")), "no"),
    "PartMix": ((("77.78", "74.62"), ("81.52", "84.38"), ("85.66", "82.27"), ("84.93", "82.52")), "no"),
    "MUN": ((("76.24", "73.81"), ("79.42", "82.06"), ("95.19", "87.15"), ("91.86", "85.01")), "no"),
    "SAAI": ((("75.90", "77.03"), ("83.20", "88.01"), ("91.07", "91.45"), ("92.09", "92.01")), "yes"),
    "IDKL": ((("81.42", "79.85"), ("87.14", "89.37"), ("94.72", "90.19"), ("94.22", "90.43")), "yes"),
}
for method, (numbers, rr) in FOUR.items():
  for (dataset, setting), (r1, m) in zip((("sysu", SYSU_ALL), ("sysu", SYSU_INDOOR), ("regdb", V2I), ("regdb", I2V)),
                                          numbers):
    EXPECTED[(dataset, setting, method)] = (r1, m, "-", rr)
EXPECTED[("llcm", V2I, "DEEN")] = ("62.50", "65.80", "-", "no")
EXPECTED[("llcm", I2V, "DEEN")] = ("54.90", "62.90", "-", "no")
EXPECTED[("llcm", V2I, "DSFAD")] = ("66.20", "68.90", "-", "not stated")
EXPECTED[("llcm", I2V, "DSFAD")] = ("57.50", "64.10", "-", "not stated")


def test_the_file_quotes_the_sources_numbers_with_their_direction_and_reranking():
  rows = published.load()
  got = {}
  for r in rows:
    if r["setting"] != published.UNKNOWN_SETTING:
      key = (r["dataset"], r["setting"], r["method"])
      assert key not in got, f"two rows for {key}"
      got[key] = (r["Rank-1"], r["mAP"], r["mINP"], r["re-ranked"])
  for key, expected in EXPECTED.items():
    assert got.get(key) == expected, key
  assert all(r["source"] not in ("", "-") for r in rows)
  assert all(r["dataset"] in ("sysu", "regdb", "llcm") for r in rows)
  fdnm = [r for r in rows if r["method"] == "FDNM"]
  assert len(fdnm) == 1 and "abstract" in fdnm[0]["source"] and fdnm[0]["setting"] == SYSU_INDOOR
  assert fdnm[0]["Rank-1"].startswith("+5.2") and fdnm[0]["mAP"].startswith("+5.8")
  # DEEN's README rows (their direction is not stated) are kept but shown beside no setting.
  unknown = [(r["Rank-1"], r["mAP"]) for r in rows if r["setting"] == published.UNKNOWN_SETTING]
  assert ("56.73", "63.28") in unknown and ("55.52", "62.07") in unknown
  shown = {(r["method"], r["Rank-1"]) for s in (V2I, I2V) for r in published.rows_for("llcm", s, rows)}
  assert ("DEEN", "56.73") not in shown and ("DEEN", "62.50") in shown


def test_rows_for_a_setting_include_wildcard_rows_only_of_that_dataset():
  rows = published.parse(HEADER + "| llcm | * | A | 1.5 | 2 | - | no | s1 | n |\n"
                         "| llcm | visible_to_infrared | B | 3 | 4 | 5 | yes | s2 | |\n"
                         "| llcm | ? | U | 3 | 4 | 5 | no | s4 | |\n"
                         "| sysu | * | C | 6 | 7 | 8 | not stated | s3 | |\n\nafter the table\n")
  assert [r["method"] for r in published.rows_for("llcm", "visible_to_infrared", rows)] == ["A", "B"]
  assert [r["method"] for r in published.rows_for("llcm", "infrared_to_visible", rows)] == ["A"]
  assert published.rows_for("synthetic", "visible_to_infrared", rows) == []
  assert published.value("1.5") == 1.5 and published.value("-") is None
  assert published.value("+5.2 over the runner-up") is None


def test_parse_errors_name_the_line():
  with pytest.raises(ValueError, match=r"x.md: no table with the header"):
    published.parse("| a | b |\n|---|---|\n", "x.md")
  with pytest.raises(ValueError, match=r"x.md:3: 3 cells, expected 9"):
    published.parse(HEADER + "| a | b | c |\n", "x.md")
  with pytest.raises(ValueError, match=r"x.md:3: the row of M has no source"):
    published.parse(HEADER + "| sysu | * | M | 1 | 2 | 3 | no | - | |\n", "x.md")
  with pytest.raises(ValueError, match=r"x.md:4: the row of N has re-ranked='maybe'; write one of yes, no"):
    published.parse(HEADER + "| sysu | * | M | 1 | 2 | 3 | no | s | |\n| sysu | * | N | 1 | 2 | 3 | maybe | s | |\n",
                    "x.md")


ROWS = HEADER + ("| regdb | visible_to_infrared | Plain | 70.05 | 66.37 | 50.19 | no | s1 | n1 |\n"
                 "| regdb | visible_to_infrared | Ranked | 91.07 | 91.45 | - | yes | s2 | n2 |\n"
                 "| regdb | infrared_to_visible | Unsure | 80.00 | 70.00 | - | not stated | s3 | |\n")


def _section_tables(md: str) -> tuple[str, str]:
  """(the comparable part, the not-comparable part) of a Published section."""
  head, _, rest = md.partition("### ")
  return head, rest


def test_reranked_rows_sit_apart_and_labelled_beside_a_plain_run():
  rows = published.parse(ROWS)
  md = published.format_published("regdb", [V2I, I2V], rows, reranked=False)
  comparable, other = _section_tables(md)
  assert "Comparable with ours (not re-ranked)" in comparable
  assert "| visible_to_infrared | Plain (quoted) | 70.05 | 66.37 | 50.19 | s1 | n1 |" in comparable
  assert "| infrared_to_visible | Unsure (quoted, re-ranking not stated) | 80.00 |" in comparable
  assert "Ranked" not in comparable
  assert other.startswith("Re-ranked: NOT comparable with ours, which are not re-ranked")
  assert "| visible_to_infrared | Ranked (quoted, re-ranked) | 91.07 | 91.45 | - | s2 | n2 |" in other
  assert "Plain" not in other and "Unsure" not in other


def test_plain_rows_sit_apart_beside_a_reranked_run():
  rows = published.parse(ROWS)
  comparable, other = _section_tables(published.format_published("regdb", [V2I, I2V], rows, reranked=True))
  assert "Comparable with ours (re-ranked)" in comparable and "Ranked (quoted, re-ranked)" in comparable
  assert "Plain" not in comparable and "Unsure" not in comparable
  assert other.startswith("Not re-ranked (or not stated): NOT comparable with ours, which are re-ranked")
  assert "Plain (quoted)" in other and "Unsure (quoted, re-ranking not stated)" in other
  # only re-ranked peers for a setting: the section says none match before listing them apart.
  md = published.format_published("regdb", [V2I], published.parse(HEADER + ROWS.splitlines()[3] + "\n"))
  assert "No quoted numbers match ours (not re-ranked)." in md and "Ranked (quoted, re-ranked)" in md


def _report(dataset, settings, rerank=False):
  result = {"mean": {"rank1": 50.0, "mAP": 40.0}, "std": {"rank1": 0.0, "mAP": 0.0}, "trials": [1]}
  return {"name": "r", "dataset": dataset, "protocol": "regdb", "step": 7, "untrained": False, "checkpoint": "c",
          "test_flip": False, "rerank": {"enabled": rerank, "k1": 20, "k2": 6, "lambda": 0.3},
          "settings": {s: result for s in settings}}


def test_eval_summary_puts_quoted_rows_under_our_table():
  md = eval_mode.format_summary(_report("regdb", [V2I, I2V]))
  ours, quoted = md.split("## Published (quoted, not measured)")
  assert "| visible_to_infrared | 1 | 50.00 | 40.00 |" in ours and "AGW" not in ours
  comparable, other = _section_tables(quoted)
  assert "| visible_to_infrared | AGW (quoted) | 70.05 | 66.37 | 50.19 |" in comparable
  assert "| infrared_to_visible | DEEN (quoted) | 89.50 | 83.40 | - |" in comparable
  assert "| visible_to_infrared | SAAI (quoted, re-ranked) | 91.07 | 91.45 |" in other
  assert "SAAI" not in comparable and "IDKL" not in comparable
  # a re-ranked evaluation gets the re-ranked rows as its comparable ones.
  comparable, other = _section_tables(eval_mode.format_summary(_report("regdb", [V2I], rerank=True)).split(
      "## Published (quoted, not measured)")[1])
  assert "IDKL (quoted, re-ranked)" in comparable and "AGW (quoted)" in other
  md = eval_mode.format_summary(_report("synthetic", [V2I]))
  assert "No published numbers are recorded for synthetic" in md
