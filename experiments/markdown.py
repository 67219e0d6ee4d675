"""Markdown tables, the one writer every report uses; plain Python, so the GPU image (no rliable, no pandas)
can write its pages with it too."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, then one line per row.

    Examples:
        >>> markdown_table(["a", "b"], [["1", "2"]])
        ['| a | b |', '| --- | --- |', '| 1 | 2 |']
    """
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]
