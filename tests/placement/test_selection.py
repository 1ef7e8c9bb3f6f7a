"""Selections in their written forms: the text and list forms case files use, and the JSON form plans use."""

from __future__ import annotations

import pytest

from ownership.placement.selection import (
    parse_selection,
    selection_from_json,
    selection_text,
    selection_to_json,
)


def test_parse_selection() -> None:
    assert parse_selection("all") is None
    assert parse_selection("[0:8+9, :]") == (((0, 8, 1), (9, 10, 1)), None)
    assert parse_selection([":", [[4, 23, 6]]]) == (None, ((4, 23, 6),))
    for bad in ["0:8", "[0:8;, :]", "[]", [[[0, 8]]], [[[0, 8, 0]]], 3]:
        with pytest.raises(ValueError):
            parse_selection(bad)


def test_text_and_json_forms_round_trip() -> None:
    for text in ["all", "[0:8, :]", "[:, 1:24:6+2:24:6]", "[3, 0:4]"]:
        selection = parse_selection(text)
        assert selection_text(selection) == text
        assert selection_from_json(selection_to_json(selection)) == selection
