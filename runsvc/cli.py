"""The ``runsvc`` command: serve, migrate, reap, mint tokens, and operate on runs.

The run commands are ordinary gRPC clients: they send a bearer token (from
``--token`` or ``RUNSVC_TOKEN``; on the server's own host, without one, a
short-lived admin token signed with the local secret) to ``--address``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from runsvc import logs, tokens
from runsvc import settings as settings_module
from runsvc.settings import Settings, SettingsError

EXIT_USAGE = 2
EXIT_RPC_ERROR = 1


def _settings() -> Settings:
    try:
        return settings_module.load()
    except SettingsError as error:
        print(f"runsvc: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from error


# --- server-side commands ------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from runsvc import server

    settings = _settings()
    logs.configure(settings.log_level)
    return server.serve(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from runsvc.store import migrate

    settings = _settings()
    migrate.upgrade(settings.effective_database_url, revision=args.revision, sql=args.sql)
    if not args.sql:
        print(f"database at revision {migrate.current(settings.effective_database_url)}")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from runsvc import server

    settings = _settings()
    logs.configure(settings.log_level)
    components = server.build(settings)
    try:
        reaper = components.reaper
        report = reaper.startup_pass() if args.startup else reaper.pass_once(detected_by="cli")
    finally:
        components.service.close()
        components.db.dispose()
    print(json.dumps({"ended": report.ended, "total": report.total}))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from runsvc import server

    secret = server.jwt_secret(_settings())
    try:
        token = tokens.issue(
            secret,
            role=args.role,
            tenant_id=args.tenant,
            ttl_seconds=args.ttl,
            subject=args.subject,
        )
    except ValueError as error:
        print(f"runsvc token: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    return 0


# --- client commands --------------------------------------------------------------


def _call(args: argparse.Namespace, rpc: str, request: Any) -> Any:
    import grpc

    from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

    token = args.token or os.environ.get("RUNSVC_TOKEN")
    if not token:
        from runsvc import server

        token = tokens.issue(
            server.jwt_secret(_settings()),
            role="admin",
            tenant_id=None,
            ttl_seconds=60,
            subject="runsvc-cli",
        )
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        try:
            return getattr(stub, rpc)(
                request, timeout=args.timeout, metadata=[("authorization", f"Bearer {token}")]
            )
        except grpc.RpcError as error:
            print(f"runsvc: {error.code().name}: {error.details()}", file=sys.stderr)
            raise SystemExit(EXIT_RPC_ERROR) from error


def _print(message: Any) -> None:
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def cmd_runs_active(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    _print(_call(args, "GetActive", pb.GetActiveRequest(tenant_id=args.tenant or "")).run)
    return 0


def cmd_runs_get(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    _print(_call(args, "GetRun", pb.GetRunRequest(run_id=args.run_id)).run)
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    states = [pb.RunState.Value(f"RUN_STATE_{s.upper()}") for s in args.state]
    _print(
        _call(
            args,
            "ListRuns",
            pb.ListRunsRequest(
                page_size=args.page_size,
                page_token=args.page_token,
                states=states,
                tenant_id=args.tenant or "",
            ),
        )
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    _print(_call(args, "Cancel", pb.CancelRequest(run_id=args.run_id, reason=args.reason)))
    return 0


def cmd_force_cancel(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    request = pb.ForceCancelRequest(run_id=args.run_id, reason=args.reason)
    _print(_call(args, "ForceCancel", request))
    return 0


# --- the parser ---------------------------------------------------------------------

RUN_STATE_NAMES = ("pending", "running", "completed", "cancelled", "stopped", "failed")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RUNSVC_GRPC_ADDRESS", Settings.grpc_address),
        help="the server (default: RUNSVC_GRPC_ADDRESS or %(default)s)",
    )
    parser.add_argument("--token", help="bearer token (default: RUNSVC_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def _command(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _command(sub, "serve", cmd_serve, "serve gRPC until SIGTERM/SIGINT")
    migrate = _command(sub, "migrate", cmd_migrate, "apply the database migrations")
    migrate.add_argument("--sql", action="store_true", help="print the SQL instead")
    migrate.add_argument("--revision", default="head")
    reap = _command(sub, "reap", cmd_reap, "finalize runs whose worker went silent")
    reap.add_argument("--once", action="store_true", required=True, help="one pass, then exit")
    reap.add_argument("--startup", action="store_true", help="apply the startup cleanup rules")
    token = _command(sub, "token", cmd_token, "print a bearer token signed with the secret")
    token.add_argument("--role", required=True, choices=sorted(tokens.ROLES))
    token.add_argument("--tenant")
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.add_argument("--subject", help="who the token stands for")

    runs = _command(sub, "runs", lambda _: EXIT_USAGE, "look at runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    active = _command(runs_sub, "active", cmd_runs_active, "the tenant's active run")
    active.add_argument("--tenant", help="admin tokens only")
    get = _command(runs_sub, "get", cmd_runs_get, "one run")
    get.add_argument("run_id")
    listing = _command(runs_sub, "list", cmd_runs_list, "runs, newest first")
    listing.add_argument("--state", action="append", default=[], choices=RUN_STATE_NAMES)
    listing.add_argument("--page-size", type=int, default=50)
    listing.add_argument("--page-token", default="")
    listing.add_argument("--tenant", help="admin tokens only")
    for p in (active, get, listing):
        _client_options(p)

    cancel = _command(sub, "cancel", cmd_cancel, "ask the run's worker to stop")
    force = _command(sub, "force-cancel", cmd_force_cancel, "end the run now")
    for p in (cancel, force):
        p.add_argument("run_id")
        p.add_argument("--reason", default="")
        _client_options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
