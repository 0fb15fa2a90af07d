"""Published numbers of peer methods (docs/published_results.md), quoted next to ours in the eval reports.

The file's table has the columns COLUMNS; every row names its source. `rows_for(dataset, setting)` returns the rows
of one protocol setting (rows whose setting is `*` apply to every setting of their data set), and
`format_published(dataset, settings)` the Markdown section the eval mode appends to its report, headed
"Published (quoted, not measured)".
"""

import os
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(REPO, "docs", "published_results.md")
COLUMNS = ("dataset", "setting", "method", "Rank-1", "mAP", "mINP", "source", "note")
HEADING = "Published (quoted, not measured)"
ANY_SETTING = "*"


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def parse(text: str, path: str = "<text>") -> list[dict[str, str]]:
  """The rows of the first Markdown table whose header is COLUMNS, as {column: cell text}.

  Raises:
    ValueError: no such table, or a row with another number of cells (the message names the line).
  """
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if line.lstrip().startswith("|") and tuple(_cells(line)) == COLUMNS:
      break
  else:
    raise ValueError(f"{path}: no table with the header | {' | '.join(COLUMNS)} |")
  rows = []
  for n, line in enumerate(lines[i + 2:], start=i + 3):
    if not line.lstrip().startswith("|"):
      break
    cells = _cells(line)
    if len(cells) != len(COLUMNS):
      raise ValueError(f"{path}:{n}: {len(cells)} cells, expected {len(COLUMNS)} ({', '.join(COLUMNS)})")
    row = dict(zip(COLUMNS, cells))
    if not row["source"] or row["source"] == "-":
      raise ValueError(f"{path}:{n}: the row of {row['method']} has no source; every quoted number needs one")
    rows.append(row)
  return rows


def load(path: str = DEFAULT_PATH) -> list[dict[str, str]]:
  """`parse` of the published-results file (default docs/published_results.md)."""
  with open(path) as f:
    return parse(f.read(), path)


def value(cell: str) -> Optional[float]:
  """A cell as a number in percent, or None when it is not one ('-', a relative claim)."""
  try:
    return float(cell)
  except ValueError:
    return None


def rows_for(dataset: str, setting: str, rows: Optional[Sequence[dict]] = None) -> list[dict[str, str]]:
  """The quoted rows of one (dataset, protocol setting), in file order; `*` rows apply to every setting."""
  rows = load() if rows is None else rows
  return [r for r in rows if r["dataset"] == dataset and r["setting"] in (setting, ANY_SETTING)]


def format_published(dataset: str, settings: Sequence[str], rows: Optional[Sequence[dict]] = None) -> str:
  """The Markdown section of the quoted rows for `settings` of `dataset`, or a line saying there are none."""
  rows = load() if rows is None else rows
  lines = [f"## {HEADING}", "",
           "Quoted from the sources named in each row (docs/published_results.md); not measured by fdnm-jax, "
           "and not necessarily under the same training recipe, resolution or number of trials.", ""]
  table = []
  for setting in settings:
    for r in rows_for(dataset, setting, rows):
      table.append(f"| {setting} | {r['method']} (quoted) | {r['Rank-1']} | {r['mAP']} | {r['mINP']} | "
                   f"{r['source']} | {r['note']} |")
  if not table:
    return "\n".join(lines + [f"No published numbers are recorded for {dataset} ({', '.join(settings)})."])
  header = ["| setting | method | Rank-1 | mAP | mINP | source | note |", "|---|---|---|---|---|---|---|"]
  return "\n".join(lines + header + table)
