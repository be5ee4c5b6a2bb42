"""The one markdown and CSV table writer of the reports (a study's summary, the paper reproduction's table)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured markdown table as lines: the header, its rule, one line per row.

    A `|` inside a cell (a failure reason, say) is escaped, so it cannot split the cell.
    """
    line = lambda cells: "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
    lines = [line(header), "|---" * len(header) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {list(row)}")
        lines.append(line(row))
    return lines


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV (RFC 4180 quoting) with a header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def csv_number(value: float) -> str:
    """A value for a CSV cell: 4 decimals, empty where it is undefined (NaN, e.g. no interval at n = 1)."""
    return f"{value:.4f}" if math.isfinite(value) else ""
