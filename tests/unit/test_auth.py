"""Who may call what: the roles table, the caller's tenant and the bearer tokens."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import jwt
import pytest

from runsvc import tokens
from runsvc.api.auth import RPC_RATE_CLASSES, RPC_ROLES, SERVICE, required_tenant, tenant_scope
from runsvc.errors import InvalidArgument, PermissionDenied, Unauthenticated
from runsvc.ratelimit import DEFAULT_LIMITS
from runsvc.tokens import Principal
from runsvc_client.v1 import run_service_pb2 as pb

SECRET = "a-signing-secret-long-enough-for-hs256-0123456789"
OTHER_SECRET = "another-signing-secret-long-enough-for-hs256-9876"

RUN_SERVICE = pb.DESCRIPTOR.services_by_name["RunService"]
METHODS = {method.name for method in RUN_SERVICE.methods}

BACKEND = Principal(subject="backend:t1", role="backend", tenant_id="t1")
ADMIN = Principal(subject="admin:*", role="admin", tenant_id=None)


def sign(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def fresh(**claims: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "someone", "iat": now, "exp": now + 300, **claims}


# --- the roles table -------------------------------------------------------------------


def test_the_service_name_is_the_descriptors() -> None:
    assert RUN_SERVICE.full_name == SERVICE


def test_every_rpc_has_an_entry() -> None:
    missing = METHODS - set(RPC_ROLES)
    assert not missing, f"RPCs without an entry in RPC_ROLES: {sorted(missing)}"


def test_every_entry_names_a_real_rpc() -> None:
    unknown = set(RPC_ROLES) - METHODS
    assert not unknown, f"RPC_ROLES entries for no RPC: {sorted(unknown)}"


def test_every_rpc_has_a_rate_class() -> None:
    assert set(RPC_RATE_CLASSES) == METHODS
    assert set(RPC_RATE_CLASSES.values()) <= set(DEFAULT_LIMITS)
    # Heartbeats alone draw from their own budget: no flood can make a run go stale.
    assert [m for m, c in RPC_RATE_CLASSES.items() if c == "heartbeat"] == ["Heartbeat"]


def test_an_admin_cannot_name_a_malformed_tenant() -> None:
    for bad in ("t" * 129, "t\n1"):
        with pytest.raises(InvalidArgument):
            tenant_scope(ADMIN, bad)


@pytest.mark.parametrize("method", sorted(RPC_ROLES))
def test_every_entry_allows_only_known_roles(method: str) -> None:
    roles = RPC_ROLES[method]
    assert roles, f"{method} is open to nobody"
    assert roles <= tokens.ROLES


def test_worker_and_backend_rpcs_are_apart() -> None:
    for method in ("ClaimRun", "Heartbeat", "AcquireJobs", "ReportJobs", "FinishRun"):
        assert RPC_ROLES[method] == {"worker"}
    for method in ("CreateRun", "GetActive", "GetRun", "ListRuns", "Cancel", "ForceCancel"):
        assert RPC_ROLES[method] == {"backend", "admin"}


# --- the caller's tenant ---------------------------------------------------------------


def test_backend_acts_for_its_own_tenant() -> None:
    assert tenant_scope(BACKEND, "") == "t1"
    assert tenant_scope(BACKEND, "t1") == "t1"
    assert required_tenant(BACKEND, "") == "t1"
    assert required_tenant(BACKEND, "t1") == "t1"


def test_backend_cannot_name_another_tenant() -> None:
    with pytest.raises(PermissionDenied):
        tenant_scope(BACKEND, "t2")
    with pytest.raises(PermissionDenied):
        required_tenant(BACKEND, "t2")


def test_admin_may_name_a_tenant_or_none() -> None:
    assert tenant_scope(ADMIN, "t2") == "t2"
    assert tenant_scope(ADMIN, "") is None
    assert required_tenant(ADMIN, "t2") == "t2"


def test_admin_must_name_a_tenant_where_one_is_required() -> None:
    with pytest.raises(InvalidArgument) as raised:
        required_tenant(ADMIN, "")
    assert [v.field for v in raised.value.violations] == ["tenant_id"]


def test_tenant_bound_worker_cannot_name_another_tenant() -> None:
    worker = Principal(subject="w", role="worker", tenant_id="t1")
    assert tenant_scope(worker, "") == "t1"
    with pytest.raises(PermissionDenied):
        tenant_scope(worker, "t2")


# --- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "tenant"),
    [("backend", "t1"), ("admin", None), ("worker", None), ("worker", "t1")],
)
def test_issue_then_verify(role: str, tenant: str | None) -> None:
    token = tokens.issue(SECRET, role=role, tenant_id=tenant, ttl_seconds=60)
    principal = tokens.verify(SECRET, token)
    assert principal == Principal(subject=f"{role}:{tenant or '*'}", role=role, tenant_id=tenant)


def _signed(**claims: object) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 60, **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "ops", "role": "admin", "tenant": "t2"},  # an admin pinned to a tenant
        {"sub": "w", "role": "worker", "tenant": ""},  # an empty tenant is not "every tenant"
        {"sub": "b", "role": "backend", "tenant": ""},
        {"role": "worker", "tenant": "t1"},  # a worker without an identity
        {"sub": "", "role": "worker", "tenant": "t1"},
        {"sub": "host/2", "role": "worker", "tenant": "t1"},  # would pass for host's process
        {"sub": "w\x00x", "role": "worker", "tenant": "t1"},  # NUL in the subject
        {"sub": "w\nx", "role": "worker"},
        {"sub": "b", "role": "backend", "tenant": "t\x001"},
        {"sub": "ops", "role": ["admin"]},  # a role that is not a string
        {"sub": "ops", "role": {"admin": True}},
        {"sub": "ops", "role": "root"},
        {"sub": 7, "role": "admin"},
        {"sub": "b", "role": "backend", "tenant": ["t1"]},
    ],
)
def test_loose_claims_are_refused(claims: dict[str, object]) -> None:
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, _signed(**claims))


def test_a_token_may_live_a_day_at_most() -> None:
    now = int(time.time())
    day = int(tokens.MAX_LIFETIME_SECONDS)
    ok = {"sub": "b", "role": "backend", "tenant": "t1"}
    assert tokens.verify(SECRET, jwt.encode({**ok, "iat": now, "exp": now + day}, SECRET)).role
    for lifetime in ({"iat": now, "exp": now + day + 60}, {"exp": now + day + 60}):
        with pytest.raises(Unauthenticated):
            tokens.verify(SECRET, jwt.encode({**ok, **lifetime}, SECRET))
    # Issued long ago, still within its day: the lifetime counts from iat, not from now.
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, jwt.encode({**ok, "iat": now - 2 * day, "exp": now + 3600}, SECRET))
    shorter = tokens.Verifier(secret=SECRET, max_lifetime=600)
    with pytest.raises(Unauthenticated):
        shorter.verify(jwt.encode({**ok, "iat": now, "exp": now + 3600}, SECRET))


def test_issue_refuses_what_verify_would_refuse() -> None:
    with pytest.raises(ValueError, match="admin"):
        tokens.issue(SECRET, role="admin", tenant_id="t1", ttl_seconds=60)
    with pytest.raises(ValueError, match="/"):
        tokens.issue(SECRET, role="worker", tenant_id="t1", ttl_seconds=60, subject="h/2")


def test_issue_keeps_the_subject() -> None:
    token = tokens.issue(SECRET, role="worker", tenant_id=None, ttl_seconds=60, subject="w-7")
    assert tokens.verify(SECRET, token).subject == "w-7"


def test_issued_claims() -> None:
    before = int(time.time())
    token = tokens.issue(SECRET, role="backend", tenant_id="t1", ttl_seconds=120)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["role"] == "backend"
    assert claims["tenant"] == "t1"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 120
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_expired_token_is_refused() -> None:
    token = tokens.issue(
        SECRET, role="backend", tenant_id="t1", ttl_seconds=-(tokens.LEEWAY_SECONDS + 10)
    )
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, token)


def test_token_just_expired_is_within_the_leeway() -> None:
    token = tokens.issue(SECRET, role="backend", tenant_id="t1", ttl_seconds=-1)
    assert tokens.verify(SECRET, token).tenant_id == "t1"


def test_wrong_secret_is_refused() -> None:
    token = tokens.issue(SECRET, role="admin", tenant_id=None, ttl_seconds=60)
    with pytest.raises(Unauthenticated):
        tokens.verify(OTHER_SECRET, token)


def test_unsigned_token_is_refused() -> None:
    token = jwt.encode(fresh(role="admin"), "", algorithm="none")
    assert jwt.get_unverified_header(token)["alg"] == "none"
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, token)


def test_tampered_token_is_refused() -> None:
    token = tokens.issue(SECRET, role="backend", tenant_id="t1", ttl_seconds=60)
    header, _, signature = token.split(".")
    forged_claims = jwt.encode(fresh(role="admin"), SECRET, algorithm="HS256").split(".")[1]
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, f"{header}.{forged_claims}.{signature}")


@pytest.mark.parametrize("garbage", ["", "not-a-token", "a.b.c"])
def test_garbage_is_refused(garbage: str) -> None:
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, garbage)


def test_backend_token_without_tenant_is_refused_at_issue() -> None:
    with pytest.raises(ValueError, match="tenant"):
        tokens.issue(SECRET, role="backend", tenant_id=None, ttl_seconds=60)
    with pytest.raises(ValueError, match="tenant"):
        tokens.issue(SECRET, role="backend", tenant_id="", ttl_seconds=60)


@pytest.mark.parametrize("tenant", [None, ""])
def test_backend_token_without_tenant_is_refused_at_verify(tenant: str | None) -> None:
    claims = fresh(role="backend")
    if tenant is not None:
        claims["tenant"] = tenant
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, sign(claims))


def test_unknown_role_is_refused_at_issue() -> None:
    with pytest.raises(ValueError, match="role"):
        tokens.issue(SECRET, role="root", tenant_id="t1", ttl_seconds=60)


@pytest.mark.parametrize(
    "claims",
    [
        fresh(role="root", tenant="t1"),
        fresh(role="", tenant="t1"),
        fresh(tenant="t1"),  # no role
        {"sub": "x", "role": "admin"},  # no exp
        fresh(role="backend", tenant=7),
        fresh(role="backend", tenant=["t1"]),
    ],
    ids=["unknown-role", "empty-role", "no-role", "no-exp", "int-tenant", "list-tenant"],
)
def test_bad_claims_are_refused_at_verify(claims: dict[str, object]) -> None:
    with pytest.raises(Unauthenticated):
        tokens.verify(SECRET, sign(claims))


def test_refusals_say_the_same_thing() -> None:
    messages = set()
    for token in (
        sign(fresh(role="root")),
        sign(fresh(role="backend")),
        sign(fresh(role="admin"), OTHER_SECRET),
        tokens.issue(SECRET, role="admin", tenant_id=None, ttl_seconds=-60),
    ):
        with pytest.raises(Unauthenticated) as raised:
            tokens.verify(SECRET, token)
        messages.add(raised.value.message)
    assert len(messages) == 1


# --- the secret kept in the data folder -------------------------------------------------


def test_load_or_create_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "data" / "jwt-secret"
    secret = tokens.load_or_create_secret(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(secret) >= 32
    assert path.read_text().strip() == secret

    again = tokens.load_or_create_secret(path)
    assert again == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_or_create_secret_reads_an_existing_secret(tmp_path: Path) -> None:
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    assert tokens.load_or_create_secret(path) == SECRET


def test_a_secret_others_could_read_or_replace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    for mode in (0o604, 0o644, 0o660):  # others may read, or the group may write
        path.chmod(mode)
        with pytest.raises(tokens.SecretFileError, match="read or changed by others"):
            tokens.read_secret(path)
    path.chmod(0o440)  # a mounted Secret: readable by the pod's group
    assert tokens.read_secret(path) == SECRET
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(tokens.SecretFileError, match="link"):
        tokens.read_secret(link)
    with pytest.raises(tokens.SecretFileError, match="link"):
        tokens.load_or_create_secret(link)
    if os.geteuid() == 0:  # only root can hand the file to someone else
        os.chown(path, 4242, -1)
        with pytest.raises(tokens.SecretFileError, match="another user"):
            tokens.read_secret(path)
    with pytest.raises(tokens.SecretFileError, match="no signing secret"):
        tokens.read_secret(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_each_new_secret_differs(tmp_path: Path) -> None:
    assert tokens.load_or_create_secret(tmp_path / "a") != tokens.load_or_create_secret(
        tmp_path / "b"
    )


def test_a_created_secret_signs_tokens(tmp_path: Path) -> None:
    secret = tokens.load_or_create_secret(tmp_path / "jwt-secret")
    token = tokens.issue(secret, role="admin", tenant_id=None, ttl_seconds=60)
    assert tokens.verify(tokens.load_or_create_secret(tmp_path / "jwt-secret"), token).role == (
        "admin"
    )
