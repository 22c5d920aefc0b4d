"""Markdown to a styled, self-contained HTML page (images stay relative links): the HTML twin of every
report (demo's report.html, compare.html, diagnosis.html)."""

from __future__ import annotations

import html
from pathlib import Path

import markdown

from ckaqad.files import write_text

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;line-height:1.45}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "img{max-width:100%}")


def markdown_page(text: str, title: str) -> str:
    """The page for markdown `text` (tables extension on) with `title` in its head."""
    body = markdown.markdown(text, extensions=["tables"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def write_page(path: Path, text: str, title: str) -> None:
    """Write `markdown_page(text, title)` to `path`."""
    write_text(path, markdown_page(text, title))
