"""`meshproxy dev-certs DIR`: a throwaway CA and mesh certificates for trying mTLS.

Writes ca.pem (and ca-key.pem), then server.pem / server-key.pem and
client.pem / client-key.pem, each with a SPIFFE URI SAN
(spiffe://mesh/ns/default/sa/NAME), plus DNS localhost and IP 127.0.0.1 for
the server. For development and tests only: the keys are written unencrypted.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "mesh"


def spiffe_id(service: str, namespace: str = "default") -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service}"


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def new_ca(name: str = "meshproxy dev CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(ca: Authority, common_name: str, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), valid_days: float = 30, expired: bool = False) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by `ca`, for both server and client use."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        start, end = now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write(directory: Path, server: str = "server", client: str = "client") -> dict[str, Path]:
    """A CA, a server and a client certificate in `directory`; the paths by role."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca()
    out = {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem"}
    out["ca"].write_bytes(ca.pem())
    _write_key(out["ca_key"], ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    for role, name, extra in (("server", server, {"dns": ("localhost",), "ips": ("127.0.0.1",)}),
                              ("client", client, {})):
        cert, key = issue(ca, name, uris=(spiffe_id(name),), **extra)  # type: ignore[arg-type]
        out[role] = directory / f"{role}.pem"
        out[f"{role}_key"] = directory / f"{role}-key.pem"
        out[role].write_bytes(cert)
        _write_key(out[f"{role}_key"], key)
    return out


def _write_key(path: Path, pem: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(pem)


def main(directory: str, server: str, client: str) -> int:
    paths = write(Path(directory), server, client)
    for role, path in paths.items():
        print(f"{role:10s} {path}")
    return 0
