"""Write a generated docs page, or with ``--check`` fail when the committed one differs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_or_check(page: Path, text: str, source: str, description: str | None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="fail if the page is out of date")
    args = parser.parse_args()
    if args.check:
        if not page.is_file() or page.read_text() != text:
            print(f"{page} is not what {source} gives: regenerate it", file=sys.stderr)
            return 1
        return 0
    page.write_text(text)
    print(f"wrote {page}")
    return 0
