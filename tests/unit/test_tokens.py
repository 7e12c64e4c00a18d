"""Token checks beyond HS256: public keys, JWKS, issuer and audience, and the classic attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import warnings
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runsvc import tokens
from runsvc.errors import Unauthenticated
from tests.keys import claims, ec_key, jwks, private_pem, public_pem, rsa_key, unsigned

SECRET = "unit-secret-that-is-long-enough-for-hs256"
EC = ec_key()
RSA = rsa_key()


def static(*keys: object) -> list[tokens.PublicKey]:
    return [tokens.PublicKey(k) for k in keys]


def verifier(**options: object) -> tokens.Verifier:
    defaults: dict[str, object] = {
        "algorithms": ("HS256", "RS256", "ES256"),
        "secret": SECRET,
        "public_keys": lambda: static(EC.public_key(), RSA.public_key()),
    }
    return tokens.Verifier(**{**defaults, **options})  # type: ignore[arg-type]


def refused(check: tokens.Verifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as error:
        check.verify(token)
    return error.value.message


@pytest.mark.parametrize(("algorithm", "key"), [("ES256", EC), ("RS256", RSA)])
def test_public_key_algorithms(
    algorithm: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(claims("worker", "t1", subject="w1"), key, algorithm=algorithm)
    assert verifier().verify(token) == tokens.Principal("w1", "worker", "t1")


def test_an_algorithm_outside_the_allowlist_is_refused() -> None:
    token = jwt.encode(claims("backend", "t1"), EC, algorithm="ES256")
    assert refused(verifier(algorithms=("HS256",), public_keys=None), token) == tokens.REFUSED
    other = jwt.encode(claims("backend", "t1"), SECRET * 2, algorithm="HS512")
    refused(verifier(), other)


def test_alg_none_is_refused() -> None:
    refused(verifier(), unsigned(claims("admin")))


def test_key_confusion_is_refused() -> None:
    """An HS256 token whose HMAC key is the server's public key (RFC 8725 §2.1)."""
    pem = public_pem(RSA).encode()

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + b"."
        + b64(json.dumps(claims("admin")).encode())
    )
    signature = b64(hmac.new(pem, signing_input, hashlib.sha256).digest())
    forged = (signing_input + b"." + signature).decode()
    refused(verifier(), forged)
    refused(verifier(algorithms=("HS256", "RS256"), secret=SECRET), forged)


def test_a_token_signed_by_another_key_is_refused() -> None:
    refused(verifier(), jwt.encode(claims("admin"), ec_key(), algorithm="ES256"))
    refused(verifier(), jwt.encode(claims("admin"), "x" * 40, algorithm="HS256"))


def test_issuer_and_audience_are_required_when_configured() -> None:
    check = verifier(issuer="https://idp.example", audience="runsvc")
    good = claims("backend", "t1", iss="https://idp.example", aud="runsvc")
    assert check.verify(jwt.encode(good, EC, algorithm="ES256")).tenant_id == "t1"
    for bad in (
        {**good, "aud": "another-service"},
        {**good, "iss": "https://evil.example"},
        {k: v for k, v in good.items() if k != "aud"},
        {k: v for k, v in good.items() if k != "iss"},
    ):
        refused(check, jwt.encode(bad, EC, algorithm="ES256"))


def test_an_audience_is_refused_when_none_is_configured() -> None:
    refused(verifier(), jwt.encode(claims("admin", aud="x"), SECRET, algorithm="HS256"))


def test_not_before_is_checked_with_the_leeway() -> None:
    now = int(time.time())
    early = jwt.encode(claims("admin", nbf=now + 60), SECRET, algorithm="HS256")
    refused(verifier(), early)
    almost = jwt.encode(claims("admin", nbf=now + 2), SECRET, algorithm="HS256")
    assert verifier(leeway=5).verify(almost).role == "admin"


def test_issued_at_in_the_future_is_no_reason_to_refuse() -> None:
    """To a replica whose clock runs 90 s behind the issuer's, a fresh token looks issued later."""
    now = int(time.time())
    ahead = jwt.encode(claims("admin", iat=now + 90), SECRET, algorithm="HS256")
    assert verifier(leeway=5).verify(ahead).role == "admin"


def test_expiry_is_required() -> None:
    body = claims("admin")
    del body["exp"]
    refused(verifier(), jwt.encode(body, SECRET, algorithm="HS256"))


def test_an_oversized_token_is_refused_before_parsing() -> None:
    refused(verifier(), "a" * (tokens.MAX_TOKEN_BYTES + 1))


def test_a_bad_tenant_claim_is_refused() -> None:
    refused(verifier(), jwt.encode(claims("backend", "t\n1"), SECRET, algorithm="HS256"))
    refused(verifier(), jwt.encode(claims("backend", "t" * 200), SECRET, algorithm="HS256"))


def test_small_rsa_keys_are_never_used() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns about the short key it is told to use
        token = jwt.encode(claims("admin"), weak, algorithm="RS256")
    refused(verifier(public_keys=lambda: static(weak.public_key())), token)


def test_jwks_picks_the_key_by_kid(tmp_path: Path) -> None:
    old, new = ec_key(), ec_key()
    keys = tokens.load_jwks(jwks(("old", old), ("new", new)))
    check = verifier(public_keys=lambda: keys)
    for kid, key in (("old", old), ("new", new)):
        token = jwt.encode(claims("admin"), key, algorithm="ES256", headers={"kid": kid})
        assert check.verify(token).role == "admin"
    wrong = jwt.encode(claims("admin"), old, algorithm="ES256", headers={"kid": "new"})
    refused(check, wrong)


def test_jwks_refuses_private_and_symmetric_keys() -> None:
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC))
    with pytest.raises(ValueError):
        tokens.load_jwks(json.dumps({"keys": [private]}))
    with pytest.raises(ValueError):
        tokens.load_jwks(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError):
        tokens.load_jwks(json.dumps({"keys": []}))


def test_a_pem_file_may_hold_several_keys_and_is_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = ec_key(), rsa_key(), ec_key()
    path = tmp_path / "keys.pem"
    path.write_text(public_pem(first) + public_pem(second))
    monkeypatch.setattr(tokens, "KEY_RELOAD_SECONDS", 0.0)
    source = tokens.KeyFile(path, tokens.load_pem_keys)
    check = verifier(public_keys=source.keys)
    assert check.verify(jwt.encode(claims("admin"), first, algorithm="ES256")).role == "admin"
    assert check.verify(jwt.encode(claims("admin"), second, algorithm="RS256")).role == "admin"
    refused(check, jwt.encode(claims("admin"), third, algorithm="ES256"))
    path.write_text(public_pem(third))  # rotation: the new key in, the old ones out
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert check.verify(jwt.encode(claims("admin"), third, algorithm="ES256")).role == "admin"
    refused(check, jwt.encode(claims("admin"), first, algorithm="ES256"))


def test_a_private_key_file_is_not_a_public_key_file() -> None:
    with pytest.raises(ValueError):
        tokens.load_pem_keys(private_pem(EC).decode())


def test_issue_sets_issuer_and_audience() -> None:
    token = tokens.issue(
        SECRET, role="admin", tenant_id=None, ttl_seconds=60, issuer="me", audience="runsvc"
    )
    check = tokens.Verifier(secret=SECRET, issuer="me", audience="runsvc")
    assert check.verify(token).role == "admin"


def test_a_verifier_needs_the_keys_of_its_algorithms() -> None:
    with pytest.raises(ValueError):
        tokens.Verifier(algorithms=("HS256",), secret=None)
    with pytest.raises(ValueError):
        tokens.Verifier(algorithms=("ES256",))
    with pytest.raises(ValueError):
        tokens.Verifier(algorithms=("none",), secret=SECRET)
