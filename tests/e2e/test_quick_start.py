"""The README's quick start, run as written against a server started like ``make run``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.e2e.test_cli import CLI_TIMEOUT, kill, runsvc_command, start_server

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "__exit_status__"


def quick_start_commands() -> list[str]:
    """The indented lines of the block after "Then, in another shell", comments dropped."""
    text = README.read_text()
    block = text[text.index("Then, in another shell") :].split("\n\n", 2)[1]
    return [line.strip().split("  #")[0].rstrip() for line in block.splitlines()]


def run_as_written(commands: list[str], env: dict[str, str]) -> list[tuple[int, str, str]]:
    """Each command in one shell (so that `export` carries over): exit status and output."""
    runsvc = " ".join(runsvc_command())
    script = "\n".join(
        f'{c.replace(".venv/bin/runsvc", runsvc)} 2>>"$ERR"; echo "{MARK} $?"; '
        f'echo "{MARK}" >>"$ERR"'
        for c in commands
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT * len(commands),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    errors = Path(env["ERR"]).read_text().split(f"{MARK}\n")
    outputs = re.split(rf"{MARK} (\d+)\n", done.stdout)
    return [
        (int(outputs[i + 1]), outputs[i], errors[i // 2]) for i in range(0, len(outputs) - 1, 2)
    ]


def field(output: str, name: str) -> str:
    match = re.search(rf"^{name}\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {name} in:\n{output}"
    return match.group(1).strip()


def test_the_quick_start_works_as_written(tmp_path: Path) -> None:
    commands = quick_start_commands()
    assert [c.split()[:3] for c in commands[1:]] == [
        [".venv/bin/runsvc", "runs", "create"],
        [".venv/bin/runsvc", "runs", "active"],
        [".venv/bin/runsvc", "cancel", "1"],
        [".venv/bin/runsvc", "runs", "create"],
        [".venv/bin/runsvc", "force-cancel", "2"],
        [".venv/bin/runsvc", "runs", "active"],
    ]
    server = start_server(tmp_path / "data")
    try:
        env = {**server.env, "ERR": str(tmp_path / "stderr")}
        results = run_as_written(commands, env)
    finally:
        kill(server.process)
    export, create, active, cancel, create_again, force, none = results
    assert export[0] == 0, export
    assert create[0] == 0, create
    assert (field(create[1], "number"), field(create[1], "state")) == ("1", "PENDING")
    assert field(create[1], "jobs") == "total 100, queued 100, in_progress 0, completed 0, failed 0"
    assert field(create[1], "lease_epoch") == "0"  # a whole number, zero shown
    assert field(create[1], "tenant_id") == "acme"
    assert active[0] == 0 and field(active[1], "number") == "1"
    assert cancel[0] == 0, cancel
    assert (field(cancel[1], "state"), field(cancel[1], "cancel_reason")) == (
        "CANCELLED",
        "user asked",
    )
    assert create_again[0] == 0 and field(create_again[1], "number") == "2"
    assert force[0] == 0, force
    assert (field(force[1], "state"), field(force[1], "cancelled_jobs")) == ("CANCELLED", "10")
    assert none[0] == 1 and "NOT_FOUND" in none[2], none
