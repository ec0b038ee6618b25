"""hack/benchdoc.py: each benchmark rewrites only its own section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

import benchdoc  # noqa: E402


def test_a_section_replaces_only_what_is_between_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n<!-- bench-a:start -->\nold\n<!-- bench-a:end -->\n\nkept\n")
    benchdoc.write_section("a", "new\n", doc=doc)
    assert doc.read_text() == "# B\n\n<!-- bench-a:start -->\nnew\n<!-- bench-a:end -->\n\nkept\n"


def test_a_new_section_goes_after_the_named_one_or_at_the_end(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("# B\n<!-- bench-a:start -->\nA\n<!-- bench-a:end -->\n\ntail\n")
    benchdoc.write_section("c", "C", after="a", doc=doc)
    assert doc.read_text() == ("# B\n<!-- bench-a:start -->\nA\n<!-- bench-a:end -->\n\n"
                               "<!-- bench-c:start -->\nC\n<!-- bench-c:end -->\n\ntail\n")
    benchdoc.write_section("d", "D", after="missing", doc=doc)
    assert doc.read_text().endswith("tail\n\n<!-- bench-d:start -->\nD\n<!-- bench-d:end -->\n")


def test_a_half_marked_section_is_left_for_a_person(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("<!-- bench-a:start -->\nno end\n")
    with pytest.raises(SystemExit, match="only one of"):
        benchdoc.write_section("a", "x", doc=doc)
    assert doc.read_text() == "<!-- bench-a:start -->\nno end\n"
