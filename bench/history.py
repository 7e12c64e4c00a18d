"""``make bench-history``: do costs stay flat as the history grows?

Runs the whole benchmark twice, on fresh databases holding 10,000 and then
1,000,000 historical runs (``--small``/``--large``), and reports each path's
throughput and the reaper's pass times side by side, with the change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.run import RESULTS, default_database_url, measure

CEILING = "bare Check@64"


def compare(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Each path's change; for RPC paths also the change of its ratio to its own half's ceiling.

    The two halves run minutes apart on fresh databases, and the machine drifts
    in between: the ceiling (which reads no data) moves too. A path whose ratio
    to the ceiling of its own half holds did not pay for the history.
    """
    rows: dict[str, Any] = {}
    ceilings = (small["paths"][CEILING]["throughput"], large["paths"][CEILING]["throughput"])
    for name, row in small["paths"].items():
        other = large["paths"].get(name)
        if other:
            rows[name] = {
                "small": row["throughput"],
                "large": other["throughput"],
                "change": other["throughput"] / row["throughput"] - 1,
                "change_against_ceiling": (other["throughput"] / ceilings[1])
                / (row["throughput"] / ceilings[0])
                - 1,
            }
    for key in ("pass_seconds", "idle_pass_seconds"):
        a, b = small["reaper"][key], large["reaper"][key]
        rows[f"reaper {key}"] = {"small": a, "large": b, "change": b / a - 1}
    a, b = small["worker_flow"]["jobs_per_second"], large["worker_flow"]["jobs_per_second"]
    rows["worker flow jobs/s"] = {"small": a, "large": b, "change": b / a - 1}
    return rows


def table(small_n: int, large_n: int, rows: dict[str, Any]) -> str:
    lines = [
        f"| path | {small_n:,} runs | {large_n:,} runs | change | change against the ceiling |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        scale = 1000 if name.startswith("reaper") else 1
        unit = " ms" if scale == 1000 else "/s"
        against = row.get("change_against_ceiling")
        lines.append(
            f"| {name} | {row['small'] * scale:,.1f}{unit} | {row['large'] * scale:,.1f}{unit} | "
            f"{row['change'] * 100:+.0f}% | "
            + ("" if against is None else f"{against * 100:+.0f}%")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=default_database_url())
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "history.json")
    args = parser.parse_args()
    command = " ".join(["python -m bench.history", *sys.argv[1:]])
    runs = {}
    for size in (args.small, args.large):
        print(f"history of {size:,} runs", file=sys.stderr)
        runs[size] = measure(
            args.database_url,
            history=size,
            duration=args.duration,
            naive=False,
            command=command,
        )
    rows = compare(runs[args.small], runs[args.large])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"command": command, "comparison": rows, "runs": runs}, indent=2) + "\n"
    )
    print(table(args.small, args.large, rows))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
