"""Service tickets: short-lived signed tokens naming the calling service (sans-IO).

Knows: how to issue and verify a ticket (a JWT: PyJWT with EdDSA, ES256 or
HS256), how to load its keys, and how to sort a failed verification into one
of three classes an operator can degrade separately. Must not: read the
clock (callers pass ``now``, seconds since the epoch), touch Calls, log, or
count: ``meshproxy/filters/ticket.py`` does that.

A ticket's claims:

    iss, sub   the caller's service (the same value; the principal)
    aud        the destination service (or a configured audience)
    iat, exp   issued at, expires at (NumericDate, whole seconds)
    unit       the caller's unit (cell), when it has one

Verification classes (``Verdict.result``):

    ok        signature, algorithm, audience and times are right
    expired   a genuine ticket (good signature, right audience) past exp + leeway
    invalid   bad signature, wrong audience, wrong or ``none`` algorithm,
              malformed, a claim missing or of the wrong type, issued in the future
    missing   no ticket at all

PyJWT is asked to check only what does not depend on time (signature,
algorithm, audience, required claims); the times are checked here against
the ``now`` given, so tests need no frozen clock and the proxy's clock is
the one that counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

ALGORITHMS = ("EdDSA", "ES256", "HS256")

OK, EXPIRED, INVALID, MISSING = "ok", "expired", "invalid", "missing"
RESULTS = (OK, EXPIRED, INVALID, MISSING)
FAILURES = (EXPIRED, INVALID, MISSING)

DEFAULT_LEEWAY = 5.0
# Re-sign once this share of the lifetime is left: a ticket handed out is
# always good for at least this long, which covers the trip and some skew.
DEFAULT_REFRESH_FRACTION = 0.2
# RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
MIN_HMAC_SECRET = 32
# A ticket is a few hundred bytes; anything much larger is not ours, and is
# refused before any base64 or signature work.
MAX_TICKET_BYTES = 4096
# Tokens verified OK are remembered (issuers reuse one token for most of its
# lifetime, so most calls carry a token seen before); bounded.
VERIFIED_CACHE_SIZE = 4096
# Audiences an issuer keeps a signed token for; bounded, cleared when full.
ISSUED_CACHE_SIZE = 1024

_REQUIRED = ("iss", "sub", "aud", "iat", "exp")
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_iss": False,  # any caller may present a ticket; authz decides who gets in
    "verify_exp": False,  # times are checked against the caller's `now` (module docstring)
    "verify_iat": False,
    "verify_nbf": False,
    "require": list(_REQUIRED),
}


class TicketKeyError(ValueError):
    """A key or secret file cannot be used; the message says why (for the config error)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    result: str  # ok | expired | invalid | missing
    principal: str | None = None
    unit: str | None = None
    detail: str = ""  # for log lines: why a ticket failed ("bad signature", ...); never a label

    @property
    def ok(self) -> bool:
        return self.result == OK


MISSING_VERDICT = Verdict(MISSING, detail="no ticket")


# -- keys ------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TicketKeyError(f"cannot read '{path}': {e.strerror or e}") from None


def load_secret(path: str) -> bytes:
    """An HS256 shared secret: the file's bytes less trailing whitespace (a final newline)."""
    secret = _read(path).rstrip(b" \t\r\n")
    if len(secret) < MIN_HMAC_SECRET:
        raise TicketKeyError(
            f"'{path}': an HS256 secret needs at least {MIN_HMAC_SECRET} bytes, it has {len(secret)}"
        )
    return secret


def load_signing_key(algorithm: str, path: str) -> Any:
    """The private key (EdDSA, ES256) or the secret (HS256) an issuer signs with."""
    if algorithm == "HS256":
        return load_secret(path)
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TicketKeyError(f"'{path}' is not an unencrypted PEM private key: {e}") from None
    _check_type(algorithm, key, path)
    return key


def load_verifying_key(algorithm: str, path: str) -> Any:
    """The public key (EdDSA, ES256; a private key file is accepted, its public half
    used) or the secret (HS256) a verifier checks with."""
    if algorithm == "HS256":
        return load_secret(path)
    data = _read(path)
    try:
        key: Any = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as e:
            raise TicketKeyError(f"'{path}' is not a PEM public key (nor a private key): {e}") from None
    _check_type(algorithm, key, path)
    return key


def _check_type(algorithm: str, key: Any, path: str) -> None:
    """A key of another kind than the algorithm's would fail on the first call; fail at load."""
    if algorithm == "EdDSA":
        eddsa = (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey, ed448.Ed448PrivateKey, ed448.Ed448PublicKey)
        if not isinstance(key, eddsa):
            raise TicketKeyError(f"'{path}' holds a {_kind(key)} key; EdDSA needs an Ed25519 or Ed448 key")
    elif algorithm == "ES256":
        if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise TicketKeyError(f"'{path}' holds a {_kind(key)} key; ES256 needs a P-256 (secp256r1) key")
    else:
        raise TicketKeyError(f"unknown algorithm '{algorithm}' (expected: {', '.join(ALGORITHMS)})")


def _kind(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "unknown"


# -- issuing ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Issued:
    token: str
    iat: int
    refresh_at: float


class TicketIssuer:
    """Signs tickets for one calling service; one signed token per audience, reused
    until `refresh_fraction` of its lifetime is left (signing per call costs tens
    of microseconds)."""

    def __init__(
        self,
        algorithm: str,
        key: Any,
        service: str,
        ttl: float,
        unit: str | None = None,
        refresh_fraction: float = DEFAULT_REFRESH_FRACTION,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{algorithm}'")
        if ttl < 1:
            raise ValueError("a ticket must live at least 1s")
        self.algorithm = algorithm
        self.key = key
        self.service = service
        self.ttl = int(ttl)
        self.unit = unit or None
        self._keep = self.ttl * (1.0 - refresh_fraction)
        self._cache: dict[str, _Issued] = {}
        self.signed = 0  # how many tokens were signed (tests, debugging)

    def token(self, audience: str, now: float) -> str:
        issued = self._cache.get(audience)
        # A clock stepped back past iat also re-signs, so a token never looks issued in the future.
        if issued is not None and issued.iat <= now < issued.refresh_at:
            return issued.token
        return self._sign(audience, now)

    def _sign(self, audience: str, now: float) -> str:
        iat = int(now)
        claims: dict[str, Any] = {
            "iss": self.service, "sub": self.service, "aud": audience, "iat": iat, "exp": iat + self.ttl,
        }
        if self.unit is not None:
            claims["unit"] = self.unit
        token = jwt.encode(claims, self.key, algorithm=self.algorithm)
        if len(self._cache) >= ISSUED_CACHE_SIZE:
            self._cache.clear()
        self._cache[audience] = _Issued(token, iat, iat + self._keep)
        self.signed += 1
        return token


# -- verifying -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Good:
    verdict: Verdict
    exp: float


class TicketVerifier:
    """Verifies tickets for one destination: only `algorithm`, only `audiences`.

    `key` is one key, or a list of them while a key is rotated: a ticket is
    good if any of them verifies its signature (tried in order, so put the
    current key first)."""

    def __init__(
        self,
        algorithm: str,
        key: Any,
        audiences: tuple[str, ...],
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{algorithm}'")
        if not audiences:
            raise ValueError("a verifier needs at least one audience")
        self.algorithm = algorithm
        self.keys: tuple[Any, ...] = tuple(key) if isinstance(key, list | tuple) else (key,)
        if not self.keys:
            raise ValueError("a verifier needs at least one key")
        self.audiences = audiences
        self.leeway = leeway
        self._algorithms = [algorithm]  # the one configured; never "none", never the token's choice
        self._audience: str | list[str] = audiences[0] if len(audiences) == 1 else list(audiences)
        self._good: dict[bytes, _Good] = {}

    def verify(self, token: bytes | None, now: float) -> Verdict:
        if token is None:
            return MISSING_VERDICT
        good = self._good.get(token)
        if good is not None:
            if now > good.exp + self.leeway:
                del self._good[token]
                return Verdict(EXPIRED, good.verdict.principal, good.verdict.unit, "expired")
            return good.verdict
        if not token or len(token) > MAX_TICKET_BYTES:
            return Verdict(INVALID, detail="empty" if not token else "too long")
        try:
            claims = self._decode(token)
        except jwt.InvalidAlgorithmError:
            return Verdict(INVALID, detail="algorithm not allowed")
        except jwt.InvalidSignatureError:
            return Verdict(INVALID, detail="bad signature")
        except jwt.InvalidAudienceError:
            return Verdict(INVALID, detail="wrong audience")
        except jwt.MissingRequiredClaimError as e:
            return Verdict(INVALID, detail=f"no {e.claim} claim")
        except jwt.InvalidTokenError:
            # DecodeError and the rest: not base64, not JSON, not three parts, bad header.
            return Verdict(INVALID, detail="malformed")
        return self._check(token, claims, now)

    def _decode(self, token: bytes) -> dict[str, Any]:
        last = len(self.keys) - 1
        for i, key in enumerate(self.keys):
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=self._algorithms, audience=self._audience, options=_DECODE_OPTIONS
                )
                return claims
            except jwt.InvalidSignatureError:
                if i == last:
                    raise
        raise AssertionError("unreachable")  # every key raised or returned

    def _check(self, token: bytes, claims: dict[str, Any], now: float) -> Verdict:
        sub, iss, iat, exp = claims["sub"], claims["iss"], claims["iat"], claims["exp"]
        unit = claims.get("unit")
        if not isinstance(sub, str) or not sub or iss != sub:
            return Verdict(INVALID, detail="sub and iss must name the same service")
        if not (_is_time(iat) and _is_time(exp)) or exp < iat:
            return Verdict(INVALID, detail="bad iat/exp")
        if unit is not None and not isinstance(unit, str):
            return Verdict(INVALID, detail="bad unit claim")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_time(nbf) or nbf > now + self.leeway):
            return Verdict(INVALID, detail="not valid yet (nbf)")
        if iat > now + self.leeway:
            return Verdict(INVALID, detail="issued in the future")
        verdict = Verdict(OK, sub, unit)
        if now > exp + self.leeway:
            return Verdict(EXPIRED, sub, unit, "expired")
        if len(self._good) >= VERIFIED_CACHE_SIZE:
            del self._good[next(iter(self._good))]  # the oldest entry
        self._good[token] = _Good(verdict, float(exp))
        return verdict


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


__all__ = [
    "ALGORITHMS",
    "EXPIRED",
    "FAILURES",
    "INVALID",
    "MISSING",
    "OK",
    "RESULTS",
    "TicketIssuer",
    "TicketKeyError",
    "TicketVerifier",
    "Verdict",
    "load_secret",
    "load_signing_key",
    "load_verifying_key",
]
