"""The reports' one table writer: markdown that a renderer reads as a table, CSV that csv reads back."""

import csv
import io
import math

import pytest

from hamjepa.report.tables import csv_number, csv_text, markdown_table


def test_markdown_table_has_one_rule_and_a_line_per_row():
    lines = markdown_table(["a", "b"], [["1", "x | y"], ["2", ""]])
    assert lines == ["| a | b |", "|---|---|", "| 1 | x \\| y |", "| 2 |  |"]  # a pipe in a cell is escaped


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        markdown_table(["a", "b"], [["1", "2", "3"]])


def test_csv_round_trips_quoted_cells_and_leaves_undefined_numbers_empty():
    text = csv_text(["label", "mean"], [["test, kNN", csv_number(1 / 3)], ["n = 1", csv_number(math.nan)]])
    assert list(csv.reader(io.StringIO(text))) == [["label", "mean"], ["test, kNN", "0.3333"], ["n = 1", ""]]
