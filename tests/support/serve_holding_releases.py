"""``runsvc serve`` whose slot relay never applies a release: every committed release stays
in the outbox, so a kill lands exactly between the database commit and the Redis call.

Test code only: production settings have no such switch. Run as
``python -m tests.support.serve_holding_releases [serve arguments]``.
"""

from __future__ import annotations

import sys
from functools import partialmethod

from runsvc.cli import main
from runsvc.redisslots.relay import ReleaseRelay

if __name__ == "__main__":
    ReleaseRelay.__init__ = partialmethod(ReleaseRelay.__init__, hold=True)  # type: ignore[method-assign,assignment]
    sys.exit(main(["serve", *sys.argv[1:]]))
