"""docs/settings.md from the settings' declarations (runsvc/settings.py).

Each setting is declared once, with its variable, default, parser and help; this script
writes the reference from those declarations, and ``--check`` (run by the tests) fails when
the page and the code differ.

    python tools/gen_settings_doc.py            # write docs/settings.md
    python tools/gen_settings_doc.py --check    # exit 1 if it is not what the code gives
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runsvc import settings  # noqa: E402  (after the path, to run from a fresh checkout)
from tools.generated_page import write_or_check  # noqa: E402

PAGE = ROOT / "docs" / "settings.md"

INTRO = """\
# Settings

All settings are `RUNSVC_*` environment variables, read once at start. Every value is
checked, and a bad one stops the process with one message naming every bad variable (the
values of secrets are not repeated). A variable set to nothing counts as unset, except
`RUNSVC_METRICS_ADDRESS`, where nothing means off.

This page is generated from `runsvc/settings.py` by `tools/gen_settings_doc.py`; the tests
fail when the two differ.
"""


def shown_default(declared: Field[Any]) -> str:
    meta = declared.metadata
    if meta["shown"] is not None:
        return f"`{meta['shown']}`"
    value = declared.default
    if value is MISSING and declared.default_factory is not MISSING:
        value = declared.default_factory()
    if value is None or value in ("", {}):
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`"
    return f"`{value}`"


def page() -> str:
    lines = [INTRO.rstrip()]
    group = None
    for declared in settings.declared():
        meta = declared.metadata
        if meta["group"] != group:
            group = meta["group"]
            lines += ["", f"## {settings.GROUPS[group]}", ""]
            lines += ["| variable | default | meaning |", "|---|---|---|"]
        help_text = meta["help"].replace("|", "\\|")
        lines.append(f"| `{meta['variable']}` | {shown_default(declared)} | {help_text} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    return write_or_check(PAGE, page(), "runsvc/settings.py", __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
