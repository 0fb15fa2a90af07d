"""Published numbers of peer methods (docs/published_results.md), quoted next to ours in the eval and trials reports.

The file's table has the columns COLUMNS; every row names its source and says whether its numbers are re-ranked
("re-ranked": yes | no | not stated). `rows_for(dataset, setting)` returns the rows of one protocol setting (rows
whose setting is `*` apply to every setting of their data set; rows whose setting is `?`, a direction the source
does not state, apply to none and stay in the file for the record), and `format_published(dataset, settings,
reranked=...)` the Markdown section the reports append, headed "Published (quoted, not measured)".

Re-ranked numbers (k-reciprocal re-ranking or another test-time use of the gallery) are not comparable with numbers
that are not: the section puts the rows whose re-ranking matches ours in its first table and the others in a second
one, under a heading that says they are not comparable with ours; every row's method cell says "re-ranked" when it
is, so a re-ranked number never reads as a plain one.
"""

import os
from typing import Optional, Sequence

from fdnm_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(REPO, "docs", "published_results.md")
COLUMNS = ("dataset", "setting", "method", "Rank-1", "mAP", "mINP", "re-ranked", "source", "note")
RERANKED_VALUES = ("yes", "no", "not stated")  # what the "re-ranked" cell may say.
HEADING = "Published (quoted, not measured)"
ANY_SETTING = "*"  # the row applies to every setting of its data set.
UNKNOWN_SETTING = "?"  # the source does not say which setting (direction): shown beside none.


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(text: str, path: str = "<text>") -> list[dict[str, str]]:
  """The rows of the first Markdown table whose header is COLUMNS, as {column: cell text}.

  Raises:
    DataError (a ValueError): no such table, a row with another number of cells, a row without a source, or a
      "re-ranked" cell other than yes / no / not stated (the message names the line).
  """
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if line.lstrip().startswith("|") and tuple(_cells(line)) == COLUMNS:
      break
  else:
    raise DataError(f"{path}: no table with the header | {' | '.join(COLUMNS)} |")
  rows = []
  for n, line in enumerate(lines[i + 2:], start=i + 3):
    if not line.lstrip().startswith("|"):
      break
    cells = _cells(line)
    if len(cells) != len(COLUMNS):
      raise DataError(f"{path}:{n}: {len(cells)} cells, expected {len(COLUMNS)} ({', '.join(COLUMNS)})")
    row = dict(zip(COLUMNS, cells))
    if not row["source"] or row["source"] == "-":
      raise DataError(f"{path}:{n}: the row of {row['method']} has no source; every quoted number needs one")
    if row["re-ranked"] not in RERANKED_VALUES:
      raise DataError(f"{path}:{n}: the row of {row['method']} has re-ranked={row['re-ranked']!r}; write one of "
                      f"{', '.join(RERANKED_VALUES)}")
    rows.append(row)
  return rows


def load(path: str = DEFAULT_PATH) -> list[dict[str, str]]:
  """`parse` of the published-results file (default docs/published_results.md)."""
  with open(path, encoding="utf-8") as f:
    return parse(f.read(), path)


def value(cell: str) -> Optional[float]:
  """A cell as a number in percent, or None when it is not one ('-', a relative claim)."""
  try:
    return float(cell)
  except ValueError:
    return None


def rows_for(dataset: str, setting: str, rows: Optional[Sequence[dict]] = None) -> list[dict[str, str]]:
  """The quoted rows of one (dataset, protocol setting), in file order; `*` rows apply to every setting, `?` rows
  to none."""
  rows = load() if rows is None else rows
  return [r for r in rows if r["dataset"] == dataset and r["setting"] in (setting, ANY_SETTING)]


def comparable(row: dict, reranked: bool) -> bool:
  """Whether a quoted row may sit beside our numbers: re-ranked rows beside re-ranked runs, the others (not
  re-ranked, or not stated) beside runs that are not."""
  return (row["re-ranked"] == "yes") == bool(reranked)


def method_label(row: dict) -> str:
  """The method cell of a report: "<method> (quoted)", with the re-ranking said when it is not plain "no"."""
  extra = {"yes": ", re-ranked", "no": "", "not stated": ", re-ranking not stated"}[row["re-ranked"]]
  return f"{row['method']} (quoted{extra})"


def format_published(dataset: str, settings: Sequence[str], rows: Optional[Sequence[dict]] = None,
                     reranked: bool = False) -> str:
  """The Markdown section of the quoted rows for `settings` of `dataset`, or a line saying there are none.

  `reranked`: whether our numbers in the same report are re-ranked (config.evals.rerank); the rows that do not match
  go into a second table, headed as not comparable with ours.
  """
  rows = load() if rows is None else rows
  lines = [f"## {HEADING}", "",
           "Quoted from the sources named in each row (docs/published_results.md); not measured by fdnm-jax, "
           "and not necessarily under the same training recipe, resolution or number of trials.", ""]
  same, other = [], []
  for setting in settings:
    for r in rows_for(dataset, setting, rows):
      line = (f"| {setting} | {method_label(r)} | {r['Rank-1']} | {r['mAP']} | {r['mINP']} | {r['source']} | "
              f"{r['note']} |")
      (same if comparable(r, reranked) else other).append(line)
  if not same and not other:
    return "\n".join(lines + [f"No published numbers are recorded for {dataset} ({', '.join(settings)})."])
  header = ["| setting | method | Rank-1 | mAP | mINP | source | note |", "|---|---|---|---|---|---|---|"]
  ours = "re-ranked" if reranked else "not re-ranked"
  if same:
    lines += [f"Comparable with ours ({ours}):", ""] + header + same
  else:
    lines += [f"No quoted numbers match ours ({ours})."]
  if other:
    title = ("Re-ranked: NOT comparable with ours, which are not re-ranked" if not reranked else
             "Not re-ranked (or not stated): NOT comparable with ours, which are re-ranked")
    lines += ["", f"### {title}", ""] + header + other
  return "\n".join(lines)
