"""The docs table of every registry (docs/ARCHITECTURE.md, between the ``registries`` markers), from the registries.

    python -m scripts.registries            # rewrite the table in docs/ARCHITECTURE.md
    python -m scripts.registries --check    # exit 1 when the table is stale (tests/test_registry.py checks it too)
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
BEGIN, END = "<!-- registries: begin (python -m scripts.registries) -->", "<!-- registries: end -->"


def table() -> str:
    """The markdown table of every registry the package defines, in import order."""
    import core  # registers the method's and the metrics' choices
    import core.evaluation.methods  # noqa: F401 - the evaluation methods
    from core.registry import markdown_table, registries

    return markdown_table(registries())


def current(text: str) -> str:
    """The table between the markers of ``text``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the table is current")
    args = ap.parse_args(argv)
    text = open(DOC, encoding="utf-8").read()
    new = table()
    if current(text) == new:
        return 0
    if args.check:
        print(f"{DOC}: the registries table is stale; run python -m scripts.registries", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + "\n" + new + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
