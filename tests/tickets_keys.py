"""Ticket keys for the tests, made fresh with `cryptography` and written as PEM files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

SECRET = b"0123456789abcdef0123456789abcdef-shared"


def write_keys(directory: Path) -> dict[str, Path]:
    """{ed_key, ed_pub, ec_key, ec_pub, other_ed_key, other_ec_key, secret, other_secret}: PEM files / secret files."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def private(name: str, key: object) -> None:
        path = directory / f"{name}.pem"
        path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        out[name] = path

    def public(name: str, key: object) -> None:
        path = directory / f"{name}.pem"
        path.write_bytes(key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ))
        out[name] = path

    ed = ed25519.Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())
    private("ed_key", ed)
    public("ed_pub", ed)
    private("ec_key", p256)
    public("ec_pub", p256)
    private("other_ed_key", ed25519.Ed25519PrivateKey.generate())
    private("other_ec_key", ec.generate_private_key(ec.SECP256R1()))
    private("p384_key", ec.generate_private_key(ec.SECP384R1()))
    (directory / "secret").write_bytes(SECRET + b"\n")
    out["secret"] = directory / "secret"
    (directory / "other_secret").write_bytes(b"another-secret-of-at-least-32-bytes!!")
    out["other_secret"] = directory / "other_secret"
    (directory / "short_secret").write_bytes(b"too short")
    out["short_secret"] = directory / "short_secret"
    return out


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forged_hs256(claims: dict[str, object], secret: bytes, alg: str = "HS256") -> bytes:
    """A token MACed with `secret` (e.g. a public key's PEM bytes: the classic algorithm
    confusion attack), written by hand because PyJWT refuses to sign it."""
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, head + b"." + body, hashlib.sha256).digest()
    return head + b"." + body + b"." + b64(mac)


def unsigned(claims: dict[str, object]) -> bytes:
    """alg "none": no signature at all."""
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return head + b"." + b64(json.dumps(claims).encode()) + b"."
