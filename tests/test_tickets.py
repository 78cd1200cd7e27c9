"""The sans-IO ticket module: issue, verify, every failure class, keys, caching.

Time is a number passed in (`now`), so expiry and leeway are tested without
a clock.
"""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from meshproxy import tickets
from meshproxy.tickets import TicketIssuer, TicketKeyError, TicketVerifier
from tests.tickets_keys import forged_hs256, unsigned, write_keys

T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_keys(tmp_path_factory.mktemp("keys"))


def pair(keys: dict[str, Path], algorithm: str) -> tuple[object, object]:
    """(signing key, verifying key) of `algorithm`."""
    if algorithm == "HS256":
        secret = tickets.load_secret(str(keys["secret"]))
        return secret, secret
    name = "ed" if algorithm == "EdDSA" else "ec"
    return (
        tickets.load_signing_key(algorithm, str(keys[f"{name}_key"])),
        tickets.load_verifying_key(algorithm, str(keys[f"{name}_pub"])),
    )


def claims(**over: object) -> dict[str, object]:
    c: dict[str, object] = {"iss": "frontend", "sub": "frontend", "aud": "api", "iat": int(T0), "exp": int(T0) + 60}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.mark.parametrize("algorithm", tickets.ALGORITHMS)
def test_issue_then_verify(keys: dict[str, Path], algorithm: str) -> None:
    sign, check = pair(keys, algorithm)
    token = TicketIssuer(algorithm, sign, "frontend", 60, unit="u1").token("api", T0)
    verdict = TicketVerifier(algorithm, check, ("api",)).verify(token.encode(), T0 + 1)
    assert verdict == tickets.Verdict("ok", "frontend", "u1")
    assert verdict.ok
    decoded = jwt.decode(token, options={"verify_signature": False})
    assert decoded == {"iss": "frontend", "sub": "frontend", "aud": "api", "iat": int(T0), "exp": int(T0) + 60, "unit": "u1"}
    assert jwt.get_unverified_header(token)["alg"] == algorithm


def test_expiry_with_leeway(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "EdDSA")
    token = TicketIssuer("EdDSA", sign, "frontend", 60).token("api", T0).encode()
    exp = T0 + 60
    for now, result in [(exp, "ok"), (exp + 4.9, "ok"), (exp + 5.1, "expired"), (exp + 3600, "expired")]:
        # A fresh verifier each time: the cache of good tokens is tested below.
        verdict = TicketVerifier("EdDSA", check, ("api",), leeway=5).verify(token, now)
        assert verdict.result == result, now
    expired = TicketVerifier("EdDSA", check, ("api",), leeway=0).verify(token, exp + 0.5)
    # An expired ticket is still a genuine one: it names its caller.
    assert expired == tickets.Verdict("expired", "frontend", None, "expired")


def test_a_ticket_from_the_future_is_invalid_beyond_the_leeway(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "ES256")
    token = TicketIssuer("ES256", sign, "frontend", 60).token("api", T0 + 10).encode()
    assert TicketVerifier("ES256", check, ("api",), leeway=5).verify(token, T0).detail == "issued in the future"
    assert TicketVerifier("ES256", check, ("api",), leeway=5).verify(token, T0 + 6).ok


def test_the_cache_of_good_tokens_still_sees_expiry(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "EdDSA")
    token = TicketIssuer("EdDSA", sign, "frontend", 60).token("api", T0).encode()
    verifier = TicketVerifier("EdDSA", check, ("api",), leeway=5)
    assert verifier.verify(token, T0).ok
    assert verifier.verify(token, T0 + 30).ok  # from the cache
    assert verifier.verify(token, T0 + 66).result == "expired"
    assert verifier.verify(token, T0 + 66).result == "expired"  # and again, no longer cached


@pytest.mark.parametrize(
    ("token_of", "detail"),
    [
        (lambda k: TicketIssuer("EdDSA", k["other_ed"], "frontend", 60).token("api", T0), "bad signature"),
        (lambda k: TicketIssuer("EdDSA", k["ed"], "frontend", 60).token("billing", T0), "wrong audience"),
        (lambda k: TicketIssuer("ES256", k["ec"], "frontend", 60).token("api", T0), "algorithm not allowed"),
        (lambda k: "not.a.token", "malformed"),
        (lambda k: "garbage", "malformed"),
        (lambda k: "", "empty"),
        (lambda k: "x" * 5000, "too long"),
        (lambda k: jwt.encode(claims(exp=None), k["ed"], algorithm="EdDSA"), "no exp claim"),
        (lambda k: jwt.encode(claims(aud=None), k["ed"], algorithm="EdDSA"), "no aud claim"),
        (lambda k: jwt.encode(claims(iss="admin"), k["ed"], algorithm="EdDSA"), "sub and iss must name the same service"),
        (lambda k: jwt.encode(claims(sub=""), k["ed"], algorithm="EdDSA"), "sub and iss must name the same service"),
        (lambda k: jwt.encode(claims(exp="soon"), k["ed"], algorithm="EdDSA"), "bad iat/exp"),
        (lambda k: jwt.encode(claims(unit=7), k["ed"], algorithm="EdDSA"), "bad unit claim"),
        (lambda k: jwt.encode(claims(nbf=int(T0) + 100), k["ed"], algorithm="EdDSA"), "not valid yet (nbf)"),
    ],
)
def test_invalid_tickets(keys: dict[str, Path], token_of: object, detail: str) -> None:
    k = {
        "ed": tickets.load_signing_key("EdDSA", str(keys["ed_key"])),
        "other_ed": tickets.load_signing_key("EdDSA", str(keys["other_ed_key"])),
        "ec": tickets.load_signing_key("ES256", str(keys["ec_key"])),
    }
    token = token_of(k)  # type: ignore[operator]
    verifier = TicketVerifier("EdDSA", tickets.load_verifying_key("EdDSA", str(keys["ed_pub"])), ("api",))
    verdict = verifier.verify(token.encode() if isinstance(token, str) else token, T0 + 1)
    assert (verdict.result, verdict.detail, verdict.principal) == ("invalid", detail, None)


def test_a_tampered_payload_is_invalid(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "EdDSA")
    head, _, sig = TicketIssuer("EdDSA", sign, "frontend", 60).token("api", T0).split(".")
    other_body = jwt.encode(claims(sub="admin", iss="admin"), "x" * 32, algorithm="HS256").split(".")[1]
    verdict = TicketVerifier("EdDSA", check, ("api",)).verify(f"{head}.{other_body}.{sig}".encode(), T0)
    assert verdict.detail == "bad signature"


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_algorithm_confusion_is_refused(keys: dict[str, Path], algorithm: str) -> None:
    """HS256 MACed with the verifier's public key (as PEM bytes), and alg none: both invalid."""
    public_pem = keys["ed_pub" if algorithm == "EdDSA" else "ec_pub"].read_bytes()
    verifier = TicketVerifier(algorithm, tickets.load_verifying_key(algorithm, str(keys["ed_pub" if algorithm == "EdDSA" else "ec_pub"])), ("api",))
    for token in (forged_hs256(claims(), public_pem), unsigned(claims()), forged_hs256(claims(), public_pem, alg="None")):
        verdict = verifier.verify(token, T0 + 1)
        assert (verdict.result, verdict.detail) == ("invalid", "algorithm not allowed"), token


def test_hs256_verifier_refuses_other_algorithms_and_secrets(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "HS256")
    verifier = TicketVerifier("HS256", check, ("api",))
    ec_token = TicketIssuer("ES256", tickets.load_signing_key("ES256", str(keys["ec_key"])), "frontend", 60).token("api", T0)
    assert verifier.verify(ec_token.encode(), T0).detail == "algorithm not allowed"
    assert verifier.verify(unsigned(claims()), T0).detail == "algorithm not allowed"
    other = tickets.load_secret(str(keys["other_secret"]))
    assert verifier.verify(forged_hs256(claims(), other), T0).detail == "bad signature"
    assert verifier.verify(forged_hs256(claims(), sign), T0).ok  # type: ignore[arg-type]


def test_an_expired_ticket_with_a_bad_signature_is_invalid_not_expired(keys: dict[str, Path]) -> None:
    _, check = pair(keys, "EdDSA")
    other = tickets.load_signing_key("EdDSA", str(keys["other_ed_key"]))
    token = TicketIssuer("EdDSA", other, "frontend", 60).token("api", T0).encode()
    assert TicketVerifier("EdDSA", check, ("api",)).verify(token, T0 + 3600).result == "invalid"


def test_missing_and_several_audiences(keys: dict[str, Path]) -> None:
    sign, check = pair(keys, "EdDSA")
    verifier = TicketVerifier("EdDSA", check, ("api", "Echo"))
    assert verifier.verify(None, T0) == tickets.Verdict("missing", detail="no ticket")
    issuer = TicketIssuer("EdDSA", sign, "frontend", 60)
    assert verifier.verify(issuer.token("Echo", T0).encode(), T0).ok
    assert verifier.verify(issuer.token("api", T0).encode(), T0).ok
    assert verifier.verify(issuer.token("web", T0).encode(), T0).detail == "wrong audience"


def test_issuer_reuses_its_token_until_a_fifth_of_its_life_is_left(keys: dict[str, Path]) -> None:
    sign, _ = pair(keys, "EdDSA")
    issuer = TicketIssuer("EdDSA", sign, "frontend", 100)
    first = issuer.token("api", T0)
    assert issuer.token("api", T0 + 1) == first and issuer.token("api", T0 + 79.9) == first
    assert issuer.signed == 1
    other = issuer.token("billing", T0 + 1)  # one token per audience
    assert other != first and issuer.signed == 2
    second = issuer.token("api", T0 + 80)
    assert second != first and issuer.signed == 3
    assert jwt.decode(second, options={"verify_signature": False})["iat"] == int(T0 + 80)
    # A clock stepped back before the token's iat: sign again rather than hand out a "future" ticket.
    assert issuer.token("api", T0 + 10) != second and issuer.signed == 4


def test_issuer_cache_is_bounded(keys: dict[str, Path]) -> None:
    sign, _ = pair(keys, "HS256")
    issuer = TicketIssuer("HS256", sign, "frontend", 100)
    for i in range(tickets.ISSUED_CACHE_SIZE + 10):
        issuer.token(f"svc{i}", T0)
    assert len(issuer._cache) <= tickets.ISSUED_CACHE_SIZE


def test_verifier_cache_is_bounded(keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets, "VERIFIED_CACHE_SIZE", 8)
    sign, check = pair(keys, "HS256")
    verifier = TicketVerifier("HS256", check, ("api",))
    for i in range(20):
        assert verifier.verify(TicketIssuer("HS256", sign, f"svc{i}", 60).token("api", T0).encode(), T0).ok
    assert len(verifier._good) == 8


# -- keys ----------------------------------------------------------------------------


def test_key_errors(keys: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TicketKeyError, match=r"cannot read '/nonexistent/key.pem': No such file or directory"):
        tickets.load_signing_key("EdDSA", "/nonexistent/key.pem")
    with pytest.raises(TicketKeyError, match="EdDSA needs an Ed25519 or Ed448 key"):
        tickets.load_signing_key("EdDSA", str(keys["ec_key"]))
    with pytest.raises(TicketKeyError, match=r"holds a EC secp384r1 key; ES256 needs a P-256"):
        tickets.load_signing_key("ES256", str(keys["p384_key"]))
    with pytest.raises(TicketKeyError, match="ES256 needs a P-256"):
        tickets.load_verifying_key("ES256", str(keys["ed_pub"]))
    with pytest.raises(TicketKeyError, match="is not an unencrypted PEM private key"):
        tickets.load_signing_key("EdDSA", str(keys["ed_pub"]))
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(TicketKeyError, match="is not a PEM public key"):
        tickets.load_verifying_key("ES256", str(tmp_path / "junk.pem"))
    with pytest.raises(TicketKeyError, match="an HS256 secret needs at least 32 bytes, it has 9"):
        tickets.load_secret(str(keys["short_secret"]))


def test_a_private_key_file_verifies_too(keys: dict[str, Path]) -> None:
    sign = tickets.load_signing_key("EdDSA", str(keys["ed_key"]))
    check = tickets.load_verifying_key("EdDSA", str(keys["ed_key"]))
    assert TicketVerifier("EdDSA", check, ("api",)).verify(TicketIssuer("EdDSA", sign, "a", 60).token("api", T0).encode(), T0).ok


def test_secret_file_loses_its_final_newline(keys: dict[str, Path]) -> None:
    assert tickets.load_secret(str(keys["secret"])) == keys["secret"].read_bytes().rstrip(b"\n")


def test_several_keys_while_rotating(keys: dict[str, Path]) -> None:
    new = tickets.load_signing_key("EdDSA", str(keys["ed_key"]))
    old = tickets.load_signing_key("EdDSA", str(keys["other_ed_key"]))
    stranger = tickets.load_signing_key("EdDSA", str(ed25519_key_file(keys)))
    verifier = TicketVerifier("EdDSA", [new.public_key(), old.public_key()], ("api",))
    for key in (new, old):
        assert verifier.verify(TicketIssuer("EdDSA", key, "a", 60).token("api", T0).encode(), T0).ok
    assert verifier.verify(TicketIssuer("EdDSA", stranger, "a", 60).token("api", T0).encode(), T0).detail == "bad signature"
    # A good signature with the second key still has its audience checked.
    assert verifier.verify(TicketIssuer("EdDSA", old, "a", 60).token("web", T0).encode(), T0).detail == "wrong audience"


def ed25519_key_file(keys: dict[str, Path]) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = keys["ed_key"].parent / "stranger.pem"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path
