"""`minedraft certs DIR`: the one-time step that makes a private CA and the certificates a cluster uses.

ca.pem signs server.pem (every service presents it; its names cover loopback and the compose/Kubernetes
service names) and client.pem (what a router, or a client of a mutual-TLS router, presents); internal-token
is the bearer token only routers hold. Keys and the token are readable by their owner only. Deployments
with their own CA can bring their own certificates instead."""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "router", "router-headless", "draft", "target", "minedraft-router",
                "minedraft-draft", "minedraft-target")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minedraft"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write_private(path: Path, data: bytes) -> None:
    """Created readable by its owner only (never briefly readable by others)."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def write_certs(out_dir: Path, server_names: tuple[str, ...] = SERVER_NAMES, days: int = 365) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("minedraft CA")).issuer_name(_name("minedraft CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out_dir / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage, names in (("server", ExtendedKeyUsageOID.SERVER_AUTH, server_names),
                               ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ("minedraft-client",))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(_alt_names(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[role] = out_dir / f"{role}.pem"
        paths[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}-key"] = out_dir / f"{role}.key"
        _write_key(paths[f"{role}-key"], key)
    paths["internal-token"] = out_dir / "internal-token"  # what routers present to draft and target
    _write_private(paths["internal-token"], (secrets.token_urlsafe(32) + "\n").encode())
    return paths
