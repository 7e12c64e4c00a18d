"""``runsvc runs …``, ``cancel``, ``force-cancel``: the run commands, ordinary gRPC clients.

They send a bearer token from ``--token`` or ``RUNSVC_TOKEN``. Without one,
and only for a server on this host (a loopback address or a unix socket), they
mint a one-minute admin token with the local signing secret, which they read
and never create: a token that can act for every tenant must never leave the
host, and a command run from the wrong folder must say so rather than make a
secret no server knows. ``--ca-file`` (and ``--cert-file``/``--key-file`` for
mutual TLS) speak TLS to the server.

Output is for people by default — short state names, whole numbers, every
count shown, times in UTC — and ``--json`` prints the same fields as one JSON
object per line for scripts. Both are derived from the message's fields, so a
field added to the contract shows up without a change here.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_RPC_ERROR = 1
MINTED_TOKEN_SECONDS = 60
# Enum value names lose their type's prefix: RUN_STATE_CANCELLED is CANCELLED.
_ENUM_PREFIXES = ("RUN_STATE_", "JOB_STATE_", "JOB_OUTCOME_")


class CliError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = EXIT_USAGE


class RpcFailed(CliError):
    """The server refused the call; the message is its status and details."""

    exit_code = EXIT_RPC_ERROR


# --- where and as whom --------------------------------------------------------------


def is_local_address(address: str) -> bool:
    """A unix socket, a host of the loopback range (127.0.0.0/8, ::1, localhost), or the
    unspecified address a server listens on (0.0.0.0, ::), which is dialled on this host."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        address_of_host = ipaddress.ip_address(host)
    except ValueError:
        return False
    # 0.0.0.0 and :: (a server's own "every address") are dialled on this host.
    return address_of_host.is_loopback or address_of_host.is_unspecified


def bearer_token(args: argparse.Namespace) -> str:
    token: str | None = args.token or os.environ.get("RUNSVC_TOKEN")
    if token:
        return token
    if not is_local_address(args.address):
        raise CliError(
            f"no token for {args.address}: set RUNSVC_TOKEN or --token (a token is minted "
            "from the local secret only for a server on this host: a loopback address or a "
            "unix socket)"
        )
    from runsvc import server, tokens
    from runsvc import settings as settings_module

    try:
        settings = settings_module.load()
        secret = server.jwt_secret(settings)
    except (settings_module.SettingsError, tokens.SecretFileError) as error:
        raise CliError(
            f"{error}; run this where the server runs (the same RUNSVC_DATA_DIR or "
            "RUNSVC_JWT_SECRET), or set RUNSVC_TOKEN"
        ) from error
    return tokens.issue(
        secret,
        role="admin",
        tenant_id=None,
        ttl_seconds=MINTED_TOKEN_SECONDS,
        subject="runsvc-cli",
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )


def channel_credentials(args: argparse.Namespace) -> Any:
    """TLS credentials when a CA file is given (with a client certificate for mutual TLS)."""
    import grpc

    if not args.ca_file:
        if args.cert_file or args.key_file:
            raise CliError("--cert-file and --key-file need --ca-file")
        return None
    if bool(args.cert_file) != bool(args.key_file):
        raise CliError("--cert-file and --key-file go together")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca_file).read_bytes(),
            private_key=Path(args.key_file).read_bytes() if args.key_file else None,
            certificate_chain=Path(args.cert_file).read_bytes() if args.cert_file else None,
        )
    except OSError as error:
        raise CliError(f"cannot read {error.filename}: {error.strerror}") from error


def call(args: argparse.Namespace, rpc: str, request: Any) -> Any:
    import grpc

    from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

    credentials = channel_credentials(args)
    token = bearer_token(args)
    channel = (
        grpc.secure_channel(args.address, credentials)
        if credentials is not None
        else grpc.insecure_channel(args.address)
    )
    with channel:
        stub = pb_grpc.RunServiceStub(channel)
        try:
            return getattr(stub, rpc)(
                request, timeout=args.timeout, metadata=[("authorization", f"Bearer {token}")]
            )
        except grpc.RpcError as error:
            raise RpcFailed(f"{error.code().name}: {error.details()}") from error


# --- output --------------------------------------------------------------------------


def plain(message: Any) -> dict[str, Any]:
    """A message as plain values: short enum names, ints, times in ISO 8601, zeros kept."""
    from google.protobuf.descriptor import FieldDescriptor
    from google.protobuf.timestamp_pb2 import Timestamp

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_ENUM:
            name = field.enum_type.values_by_number[value].name
            out[field.name] = _short_enum(name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(value, Timestamp):
                out[field.name] = (
                    value.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    if message.HasField(field.name)
                    else None
                )
            elif field.is_repeated:
                out[field.name] = [plain(item) for item in value]
            else:
                out[field.name] = plain(value) if message.HasField(field.name) else None
        elif field.is_repeated:
            out[field.name] = list(value)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            out[field.name] = value.decode("utf-8", "replace")
        else:
            out[field.name] = value
    return out


def _short_enum(name: str) -> str:
    for prefix in _ENUM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def human_lines(values: dict[str, Any], indent: str = "") -> Iterator[str]:
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v}" for k, v in value.items())
            yield f"{indent}{key:<{width}}  {inner}"
        elif value is None or value == "":
            yield f"{indent}{key:<{width}}  -"
        else:
            yield f"{indent}{key:<{width}}  {value}"


def emit(args: argparse.Namespace, records: Iterable[dict[str, Any]]) -> None:
    """Each record as a JSON line (``--json``) or as a block of aligned lines."""
    first = True
    for record in records:
        if args.json:
            print(json.dumps(record, sort_keys=False))
            continue
        if not first:
            print()
        first = False
        for line in human_lines(record):
            print(line)


def run_record(run: Any) -> dict[str, Any]:
    """A run for output: the run's own fields, its job counts folded in under ``jobs``."""
    values = plain(run)
    counts = values.pop("job_counts", None) or {}
    return {**values, "jobs": counts}


# --- the commands --------------------------------------------------------------------

# The tenant of a command run with the locally minted admin token and no --tenant: on the
# server's own host `runsvc runs create --jobs 10` then `runsvc runs active` just work.
LOCAL_TENANT = "default"


def tenant_of(args: argparse.Namespace) -> str:
    """``--tenant``; else, when the CLI mints its own admin token, the local tenant."""
    if args.tenant:
        return str(args.tenant)
    if args.token or os.environ.get("RUNSVC_TOKEN"):
        return ""  # the token's own tenant
    print(f"runsvc: no --tenant: acting for tenant {LOCAL_TENANT!r}", file=sys.stderr)
    return LOCAL_TENANT


def external_ids(args: argparse.Namespace) -> list[str]:
    """``--jobs N``: N generated ids; ``--csv FILE``: the first column of each row."""
    if args.csv is None:
        if args.jobs is None or args.jobs < 1:
            raise CliError("say how many jobs with --jobs N (N >= 1), or give --csv FILE")
        return [f"job-{i}" for i in range(1, args.jobs + 1)]
    try:
        with open(args.csv, newline="", encoding="utf-8") as handle:
            rows = [row[0].strip() for row in csv.reader(handle) if row and row[0].strip()]
    except OSError as error:
        raise CliError(f"cannot read {args.csv}: {error.strerror}") from error
    if rows and rows[0].lower() in {"external_id", "id", "phone", "number"}:
        rows = rows[1:]  # a header row
    if not rows:
        raise CliError(f"{args.csv} names no jobs (one external id per line)")
    return rows


def cmd_runs_create(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    request = pb.CreateRunRequest(
        request_id=args.request_id or f"cli-{uuid.uuid4().hex}",
        jobs=[pb.JobSpec(external_id=e) for e in external_ids(args)],
        tenant_id=tenant_of(args),
    )
    emit(args, [run_record(call(args, "CreateRun", request).run)])
    return 0


def cmd_runs_active(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    answer = call(args, "GetActive", pb.GetActiveRequest(tenant_id=tenant_of(args)))
    emit(args, [run_record(answer.run)])
    return 0


def cmd_runs_get(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    emit(args, [run_record(call(args, "GetRun", pb.GetRunRequest(run_id=args.run_id)).run)])
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    states = [pb.RunState.Value(f"RUN_STATE_{s.upper()}") for s in args.state]
    answer = call(
        args,
        "ListRuns",
        pb.ListRunsRequest(
            page_size=args.page_size,
            page_token=args.page_token,
            states=states,
            tenant_id=args.tenant or "",
        ),
    )
    emit(args, [run_record(run) for run in answer.runs])
    if answer.next_page_token:
        print(f"next page: --page-token {answer.next_page_token}", file=sys.stderr)
    elif not answer.runs and not args.json:
        print("no runs", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    answer = call(args, "Cancel", pb.CancelRequest(run_id=args.run_id, reason=args.reason))
    emit(args, [run_record(answer.run)])
    return 0


def cmd_force_cancel(args: argparse.Namespace) -> int:
    from runsvc_client.v1 import run_service_pb2 as pb

    request = pb.ForceCancelRequest(run_id=args.run_id, reason=args.reason)
    answer = plain(call(args, "ForceCancel", request))
    run = answer.pop("run", None) or {}
    counts = run.pop("job_counts", None) or {}
    emit(args, [{**answer, **run, "jobs": counts}])
    return 0


def client_options(parser: argparse.ArgumentParser, default_address: str) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RUNSVC_GRPC_ADDRESS", default_address),
        help="the server (default: RUNSVC_GRPC_ADDRESS or %(default)s)",
    )
    parser.add_argument("--token", help="bearer token (default: RUNSVC_TOKEN)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--ca-file",
        default=os.environ.get("RUNSVC_CLI_CA_FILE"),
        help="speak TLS, trusting this CA (PEM; default: RUNSVC_CLI_CA_FILE)",
    )
    parser.add_argument(
        "--cert-file",
        default=os.environ.get("RUNSVC_CLI_CERT_FILE"),
        help="client certificate for mutual TLS (default: RUNSVC_CLI_CERT_FILE)",
    )
    parser.add_argument(
        "--key-file",
        default=os.environ.get("RUNSVC_CLI_KEY_FILE"),
        help="its private key (default: RUNSVC_CLI_KEY_FILE)",
    )


def cmd_runs_stale(args: argparse.Namespace) -> int:
    """Read from the store, like ``audit list``: an operator's view on the database's side."""
    from runsvc import settings as settings_module
    from runsvc.store import stats
    from runsvc.store.clock import DatabaseClock
    from runsvc.store.engine import Database, make_engine

    if args.limit < 1:
        raise CliError("--limit must be 1 or more")
    try:
        settings = settings_module.load()
    except settings_module.SettingsError as error:
        raise CliError(str(error)) from error
    db = Database(make_engine(settings.effective_database_url, max_connections=2))
    try:
        silences = db.run(
            lambda conn: stats.longest_silences(
                conn, now=DatabaseClock().now(conn), limit=args.limit
            )
        )
    finally:
        db.dispose()
    stale_after = settings.stale_after_seconds
    emit(
        args,
        [
            {
                "number": s.number,
                "id": s.run_id,
                "tenant_id": s.tenant_id,
                "worker_id": s.worker_id,
                "last_heartbeat_time": s.last_sign_of_life.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "age_seconds": round(s.age_seconds, 1),
                "stale": s.age_seconds > stale_after,
            }
            for s in silences
        ],
    )
    if not silences and not args.json:
        print("no running runs", file=sys.stderr)
    return 0
