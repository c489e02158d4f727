"""Certificates and keys of a deployment: the CA and the SuperLink's certificate, each site's SuperNode key pair.

Key formats (Flower 1.41): SuperNode keys are NIST elliptic-curve keys (P-384 here) in OpenSSH
format -- ``<name>.key`` is an unencrypted OpenSSH private key (``--auth-supernode-private-key``),
``<name>.pub`` the one-line ``ecdsa-sha2-nistp384 ...`` public key (``flwr supernode register``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtl.errors import ConfigError

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ServerCerts:
    """Paths of the files written by :func:`make_ca_and_server_cert`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(
            f"Refusing to overwrite existing file(s): {', '.join(existing)}. "
            "Move them away or choose another output folder."
        )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (never overwriting; the mode applies from the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for 0644) kept it; be exact
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def _san_entries(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    entries: list[Any] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ConfigError("Empty host name in the certificate's host list.")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def make_ca_and_server_cert(out_dir: str | os.PathLike[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                            days: int = 365) -> ServerCerts:
    """Create a private CA and a SuperLink server certificate signed by it.

    Writes ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` (PEM; EC P-256 keys, private
    keys mode 0600) into ``out_dir`` (created if missing). The server certificate carries a
    subjectAltName for every entry of ``hosts`` (IP addresses as IP SANs, names as DNS SANs);
    SuperNodes and ``flwr`` must address the SuperLink by one of them. Sites get ``ca.crt`` only.

    Raises:
        ConfigError: ``days`` < 1, no hosts, or any of the four files already exists (nothing is
            written then).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if int(days) < 1:
        raise ConfigError(f"Certificate validity `days` must be >= 1, got {days}.")
    hosts = [str(h) for h in hosts]
    if not hosts:
        raise ConfigError("At least one host (IP address or DNS name) is needed for the server certificate.")
    sans = _san_entries(hosts)
    out = Path(out_dir)
    files = ServerCerts(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    _refuse_existing([files.ca_cert, files.ca_key, files.server_cert, files.server_key])
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=int(days))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtl"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedtl deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtl"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    _write_new(files.ca_key, key_pem(ca_key), 0o600)
    _write_new(files.server_key, key_pem(server_key), 0o600)
    _write_new(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("Wrote CA and server certificate for %s to %s (valid %d days)", ", ".join(hosts), out, days)
    return files


def _check_name(name: str, what: str = "site name") -> str:
    if not _NAME_RE.match(name or ""):
        raise ConfigError(f"Invalid {what} `{name}`: use 1-64 letters, digits, `_`, `.` or `-`, "
                          "starting with a letter or digit.")
    return name


def make_site_keypair(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create a site's SuperNode authentication key pair in the format Flower 1.41 expects.

    ``<name>.key``: EC P-384 private key, unencrypted OpenSSH format (mode 0600), for
    ``flower-supernode --auth-supernode-private-key``. ``<name>.pub``: the OpenSSH public key
    line (``ecdsa-sha2-nistp384 AAAA... <name>``) the operator passes to
    ``flwr supernode register``. Returns ``(private_key_path, public_key_path)``.

    Raises:
        ConfigError: an invalid name, or either file already exists.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _check_name(name)
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    _refuse_existing([private_path, public_path])
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(private_path, private, 0o600)
    _write_new(public_path, public + f" {name}\n".encode(), 0o644)
    return private_path, public_path

