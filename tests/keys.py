"""Keys, tokens and certificates made by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def jwks(*keys: tuple[str, Any]) -> str:
    """A JWKS document with the public halves of ``(kid, private key)`` pairs."""
    entries = []
    for kid, key in keys:
        algorithm = (
            jwt.algorithms.ECAlgorithm
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else (jwt.algorithms.RSAAlgorithm)
        )
        entry = json.loads(algorithm.to_jwk(key.public_key()))
        entry["kid"] = kid
        entries.append(entry)
    return json.dumps({"keys": entries})


def claims(
    role: str,
    tenant: str | None = None,
    *,
    subject: str | None = None,
    ttl: int = 600,
    **extra: Any,
) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": subject or f"{role}:{tenant or '*'}",
        "role": role,
        "iat": now,
        "exp": now + ttl,
    }
    if tenant:
        body["tenant"] = tenant
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def unsigned(body: dict[str, Any]) -> str:
    """``alg: none``: a token with no signature at all."""
    return jwt.encode(body, "", algorithm="none")  # "none" takes no key


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1, and a way to make client certificates."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def server_cert_pem(self) -> bytes:
        return self.server_cert.public_bytes(serialization.Encoding.PEM)

    def client(
        self, *, common_name: str, unit: str | None, tenant: str | None
    ) -> tuple[bytes, bytes]:
        """(private key PEM, certificate PEM) of a client certificate signed by the CA."""
        key = ec_key()
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if unit:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        if tenant:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant))
        cert = _sign(
            x509.Name(attributes),
            key,
            self.ca_key,
            self.ca_cert.subject,
            ca=False,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return private_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _sign(
    subject: x509.Name,
    key: Any,
    issuer_key: Any,
    issuer: x509.Name,
    *,
    ca: bool,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki() -> Pki:
    ca_key = ec_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runsvc test CA")])
    ca_cert = _sign(ca_name, ca_key, ca_key, ca_name, ca=True)
    server_key = ec_key()
    server_cert = _sign(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        server_key,
        ca_key,
        ca_name,
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    return Pki(ca_key, ca_cert, server_key, server_cert)
