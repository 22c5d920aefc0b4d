"""The HTML page of a markdown report."""

from __future__ import annotations

from ckaqad.report.html import markdown_page, write_page


def test_page_renders_tables_and_escapes_the_title(tmp_path):
    page = markdown_page("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](p.png)\n", "x < y")
    assert page.startswith("<!doctype html><html><head><meta charset='utf-8'><title>x &lt; y</title><style>")
    assert "<table>" in page and "<td>1</td>" in page and '<img alt="plot" src="p.png"' in page
    write_page(tmp_path / "r.html", "text", "t")
    assert (tmp_path / "r.html").read_text() == markdown_page("text", "t")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left
