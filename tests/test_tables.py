"""The one table renderer."""

import pytest

from cmgnet.tables import render


def test_text_tables_align_labels_left_and_numbers_right():
    table = render(["split", "n", "dice"], [["test/none", 121, "88.05"], ["val", 9, "91.2"]])
    assert table.splitlines() == ["split        n   dice",
                                  "test/none  121  88.05",
                                  "val          9   91.2"]
    assert render(["a", "b"], [["x", "1"]], labels=2).splitlines()[1] == "x  1"


def test_markdown_tables_have_a_rule_and_padded_cells():
    assert render(["Network", "Dice"], [["CMG-Net", "88.1"]], markdown=True).splitlines() == [
        "| Network | Dice |", "|---------|------|", "| CMG-Net | 88.1 |"]


def test_a_short_row_is_refused():
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        render(["a", "b"], [["x"]])
