"""docs/serving.md's flag table against the settings it documents: every flag `tova-serve`
has is in the table, every flag in the table exists, and every default written as a value
(a number, a size, a word in backticks, on/off) is the field's default. Defaults the table
states in words (what None means: "the policy's", "the model's positions") are left to
the help text, which is written beside the field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from server.cli import _flagged, _spellings, _turned_off
from server.settings import ServerSettings
from tova_engine import EngineConfig

SERVING = Path(__file__).parents[1] / "docs" / "serving.md"
_SIZE = re.compile(r"(\d+(?:\.\d+)?) (KiB|MiB|GiB)")
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def table() -> dict[str, str]:
    """Each documented flag spelling -> its default cell, from the Flags section's table."""
    text = SERVING.read_text()
    section = text[text.index("### Flags"):text.index("### Keep-alive")]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`-"):
            continue
        for spelling in re.findall(r"`(-[^`]+)`", cells[0]):
            rows[spelling] = cells[1]
    return rows


def fields() -> dict[str, dataclasses.Field]:
    """Each flag spelling -> its settings field."""
    return {spelling: field for settings in (EngineConfig, ServerSettings)
            for field in _flagged(settings) for spelling in _spellings(field)}


def documented_value(cell: str):
    """The value a default cell states, or None when it says it in words."""
    if re.fullmatch(r"-?\d+", cell):
        return int(cell)
    if re.fullmatch(r"-?\d+\.\d+", cell):
        return float(cell)
    if size := _SIZE.fullmatch(cell):
        return int(float(size.group(1)) * _UNITS[size.group(2)])
    if literal := re.fullmatch(r"`([^`]+)`", cell):
        return literal.group(1)
    if cell in ("on", "off"):
        return cell == "on"
    return None


def test_every_flag_is_documented_and_every_documented_flag_exists():
    documented, flags = table(), fields()
    assert not [s for s in flags if s.startswith("--") and s not in documented]
    # (--no-x: argparse's negation of a boolean flag that is on or off by default)
    assert not [s for s in documented if s not in flags and not s.startswith("--no-")]


def test_documented_defaults_are_the_fields_defaults():
    documented, flags = table(), fields()
    checked = 0
    for spelling, cell in documented.items():
        field = flags.get(spelling)
        if field is None:
            continue
        value = documented_value(cell)
        if value is None or "env" in field.metadata:
            continue  # stated in words (what a None default means), or read from a variable
        default = field.default
        if _turned_off(field):  # --disable-x documents the flag, off by default
            default = False
        assert value == default, f"{spelling}: docs say {cell}, the field says {default!r}"
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize(("cell", "value"), [
    ("512", 512), ("0.9", 0.9), ("4 GiB", 4 * 2**30), ("`auto`", "auto"), ("off", False),
    ("the policy's", None), ("max(2048, max-num-seqs + chunk)", None),
])
def test_default_cells_are_read(cell, value):
    assert documented_value(cell) == value
