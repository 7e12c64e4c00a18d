"""The ``runsvc`` command: serve, migrate, reap, mint tokens, and operate on runs.

The run commands (runsvc/cli_runs.py) are ordinary gRPC clients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from runsvc import cli_runs, logs, tokens
from runsvc import settings as settings_module
from runsvc.settings import Settings, SettingsError

EXIT_USAGE = 2


def _settings() -> Settings:
    try:
        return settings_module.load()
    except SettingsError as error:
        print(f"runsvc: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from error


# --- server-side commands ------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from runsvc import server, supervisor

    settings = _settings()
    if args.replica_index is not None:
        logs.configure(settings.log_level, fields={"worker": args.replica_index})
        replica = server.Replica(
            index=args.replica_index,
            ready_fd=args.ready_fd,
            startup_cleanup=not args.no_startup_cleanup,
        )
        return server.serve(settings, replica=replica)
    try:
        supervisor.check_shareable(settings, args.workers)
    except SettingsError as error:
        print(f"runsvc serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level)
    if args.workers == 1:
        return server.serve(settings)
    return supervisor.serve(settings, args.workers)


def cmd_migrate(args: argparse.Namespace) -> int:
    from runsvc.store import migrate

    settings = _settings()
    url = settings.effective_database_url
    if args.check:
        # Reports only: the revisions to apply and what adoption would copy.
        plan = migrate.adopt_seed(url, apply=False)
        report = {
            "revision": migrate.current(url),
            "head": migrate.head(),
            "pending_revisions": migrate.pending(url),
            "seed_adoption": plan.as_dict(),
        }
        print(json.dumps(report, indent=2))
        return 0
    migrate.upgrade(url, revision=args.revision, sql=args.sql)
    if args.sql:
        return 0
    print(f"database at revision {migrate.current(url)}")
    if args.adopt_seed:
        print(
            json.dumps({"seed_adoption": migrate.adopt_seed(url, apply=True).as_dict()}, indent=2)
        )
    elif migrate.adopt_seed(url, apply=False).runs_copied:
        print(
            "runsvc: the monolith's outbound_call_runs/outbound_call_jobs hold runs not adopted "
            "yet; `runsvc migrate --check` shows them, `runsvc migrate --adopt-seed` copies them",
            file=sys.stderr,
        )
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from runsvc import server

    settings = _settings()
    logs.configure(settings.log_level)
    components = server.build(settings)
    try:
        # The operator vouches that heartbeats could be recorded until now: this
        # process has only just started, so its own record would judge nothing.
        components.db.trust.vouch()
        reaper = components.reaper
        report = reaper.startup_pass() if args.startup else reaper.pass_once(detected_by="cli")
    finally:
        components.service.close()
        components.db.dispose()
    print(json.dumps({"ended": report.ended, "total": report.total, "held_back": report.held_back}))
    return 0


def cmd_slots(args: argparse.Namespace) -> int:
    """``slots show``: Redis vs PostgreSQL per tenant, the outbox. ``slots reconcile``: repair."""
    import dataclasses

    from runsvc import server

    settings = _settings()
    logs.configure(settings.log_level)
    if not settings.redis_url:
        print(
            "runsvc slots: RUNSVC_REDIS_URL is not set; slots are counted in the store "
            "(a job in progress is its slot), so there is nothing to show or reconcile",
            file=sys.stderr,
        )
        return EXIT_USAGE
    components = server.build(settings)
    sync = components.slot_sync
    assert sync is not None
    try:
        if args.slots_command == "reconcile":
            report = sync.reconciler.pass_once(tenant_id=args.tenant)
            print(json.dumps(report.as_dict()))
        else:
            print(json.dumps(dataclasses.asdict(sync.figures(tenant_id=args.tenant))))
    finally:
        sync.store.client.close()
        components.db.dispose()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from runsvc import server

    settings = _settings()
    if "HS256" not in settings.jwt_algorithms:
        print("runsvc token: HS256 is not among RUNSVC_JWT_ALGORITHMS", file=sys.stderr)
        return EXIT_USAGE
    if args.ttl > settings.jwt_max_lifetime_seconds:
        print(
            f"runsvc token: --ttl {args.ttl} is longer than RUNSVC_JWT_MAX_LIFETIME_SECONDS "
            f"({settings.jwt_max_lifetime_seconds:g}); the server would refuse the token",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        secret = server.jwt_secret(settings)
    except tokens.SecretFileError as error:
        print(
            f"runsvc token: {error}; run it where the server runs (the same RUNSVC_DATA_DIR), "
            "or set RUNSVC_JWT_SECRET",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        token = tokens.issue(
            secret,
            role=args.role,
            tenant_id=args.tenant,
            ttl_seconds=args.ttl,
            subject=args.subject,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
    except ValueError as error:
        print(f"runsvc token: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    """Read straight from the store, like ``migrate`` and ``reap``: the audit trail is
    for operators on the database's side, and no RPC widens the API to expose it."""
    from runsvc.store import audit
    from runsvc.store.engine import Database, make_engine

    settings = _settings()
    db = Database(make_engine(settings.effective_database_url, max_connections=2))
    try:
        rows = db.run(
            lambda conn: audit.recent(
                conn, tenant_id=args.tenant, run_id=args.run, limit=args.limit
            )
        )
    finally:
        db.dispose()
    for row in rows:
        print(json.dumps(row, default=str, sort_keys=True))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """The store's invariants on the live database; exit 1 when any is broken."""
    from runsvc.store import check
    from runsvc.store.engine import Database, make_engine

    settings = _settings()
    db = Database(make_engine(settings.effective_database_url, max_connections=2))
    try:
        found = db.run(check.violations)
    finally:
        db.dispose()
    if settings.redis_url:
        # Slots in Redis against jobs in progress; on a busy system a grant may be
        # seen between Redis and its commit: check again before acting on one.
        from runsvc import server

        logs.configure(settings.log_level)
        components = server.build(settings)
        sync = components.slot_sync
        assert sync is not None
        try:
            figures = sync.figures()
        finally:
            sync.store.client.close()
            components.db.dispose()
        found += check.slot_violations(
            {t.tenant_id: (t.in_use, t.in_progress) for t in figures.tenants},
            pending_releases=figures.release_backlog,
        )
    for violation in found:
        print(json.dumps(violation.as_dict(), sort_keys=True))
    print(json.dumps({"violations": len(found)}))
    return 1 if found else 0


def cmd_health(args: argparse.Namespace) -> int:
    """gRPC health of a server: exit 0 when SERVING (the image's health check, a probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"runsvc health: {error.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(name)
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


# --- the parser ---------------------------------------------------------------------

RUN_STATE_NAMES = ("pending", "running", "completed", "cancelled", "stopped", "failed")


def _command(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = _command(sub, "serve", cmd_serve, "serve gRPC until SIGTERM/SIGINT")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default 1); more than 1 needs PostgreSQL "
        "and an explicit port, and process i serves its metrics on the metrics port + i",
    )
    # Set by the supervisor of --workers N on each of its processes.
    serve.add_argument("--replica-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--no-startup-cleanup", action="store_true", help=argparse.SUPPRESS)
    migrate = _command(sub, "migrate", cmd_migrate, "apply the database migrations")
    migrate.add_argument("--sql", action="store_true", help="print the SQL instead")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument(
        "--adopt-seed",
        action="store_true",
        help="then copy the monolith's outbound_call_runs/outbound_call_jobs (idempotent)",
    )
    migrate.add_argument(
        "--check", action="store_true", help="report what would be done, change nothing"
    )
    reap = _command(sub, "reap", cmd_reap, "finalize runs whose worker went silent")
    reap.add_argument("--once", action="store_true", required=True, help="one pass, then exit")
    reap.add_argument("--startup", action="store_true", help="apply the startup cleanup rules")
    slots = _command(sub, "slots", lambda _: EXIT_USAGE, "concurrency slots in Redis")
    slots_sub = slots.add_subparsers(dest="slots_command", required=True)
    for name, text in (
        ("show", "slots in use per tenant (Redis, PostgreSQL, limit) and pending releases"),
        ("reconcile", "make Redis agree with the jobs in progress in PostgreSQL, now"),
    ):
        _command(slots_sub, name, cmd_slots, text).add_argument("--tenant", help="one tenant")
    token = _command(sub, "token", cmd_token, "print a bearer token signed with the secret")
    token.add_argument("--role", required=True, choices=sorted(tokens.ROLES))
    token.add_argument("--tenant")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.add_argument("--subject", help="who the token stands for")

    _command(sub, "check", cmd_check, "verify the store's invariants (exit 1 on a violation)")
    health = _command(sub, "health", cmd_health, "a server's gRPC health (exit 0 when SERVING)")
    health.add_argument(
        "--address",
        default=os.environ.get("RUNSVC_HEALTH_ADDRESS") or Settings.grpc_address,
        help="the health port or the main port, plaintext (default: RUNSVC_HEALTH_ADDRESS, "
        "else %(default)s)",
    )
    health.add_argument("--service", default="", help="a service name (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    audit = _command(sub, "audit", lambda _: EXIT_USAGE, "the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_list = _command(
        audit_sub, "list", cmd_audit_list, "audit rows as JSON lines, oldest first"
    )
    audit_list.add_argument("--tenant", help="only this tenant's rows")
    audit_list.add_argument("--run", help="only this run's rows")
    audit_list.add_argument("--limit", type=int, default=1000, help="newest N (default 1000)")

    runs = _command(sub, "runs", lambda _: EXIT_USAGE, "create runs and look at them")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    create = _command(runs_sub, "create", cli_runs.cmd_runs_create, "create a run of jobs")
    jobs = create.add_mutually_exclusive_group(required=True)
    jobs.add_argument("--jobs", type=int, help="N jobs with generated external ids")
    jobs.add_argument("--csv", help="a file of external ids, one per line (a header is skipped)")
    create.add_argument("--request-id", help="idempotency key (default: a new one)")
    create.add_argument("--tenant", help="the tenant (needed with an admin token)")
    active = _command(runs_sub, "active", cli_runs.cmd_runs_active, "the tenant's active run")
    active.add_argument("--tenant", help="admin tokens only")
    get = _command(runs_sub, "get", cli_runs.cmd_runs_get, "one run, by number or id")
    get.add_argument("run_id", help="the run's number or id")
    listing = _command(runs_sub, "list", cli_runs.cmd_runs_list, "runs, newest first")
    listing.add_argument("--state", action="append", default=[], choices=RUN_STATE_NAMES)
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--page-token", default="")
    listing.add_argument("--tenant", help="admin tokens only")
    for p in (create, active, get, listing):
        cli_runs.client_options(p, Settings.grpc_address)
    stale = _command(
        runs_sub,
        "stale",
        cli_runs.cmd_runs_stale,
        "running runs whose worker has been silent longest (read from the database)",
    )
    stale.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    stale.add_argument("--json", action="store_true", help="one JSON object per line")

    cancel = _command(sub, "cancel", cli_runs.cmd_cancel, "ask the run's worker to stop")
    force = _command(sub, "force-cancel", cli_runs.cmd_force_cancel, "end the run now")
    for p in (cancel, force):
        p.add_argument("run_id", help="the run's number or id")
        p.add_argument("--reason", default="")
        cli_runs.client_options(p, Settings.grpc_address)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except cli_runs.CliError as error:
        print(f"runsvc: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
