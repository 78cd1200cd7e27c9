"""The risk-control callout's messages (proto/meshproxy/risk/v1/risk.proto), as
protobuf for gRPC and as its proto3 JSON mapping for plain HTTP/2.

Sans-IO: a CheckRequest in, bytes out; bytes in, a Verdict out (or
BadReply). The JSON form is the canonical proto3 JSON mapping (lowerCamelCase
names, bytes as base64, the enum by name), so one risk service can parse both
forms with its protobuf runtime.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from meshproxy.codec import protobuf as pb

GRPC_PATH = "/meshproxy.risk.v1.RiskService/Check"
JSON_PATH = "/v1/risk/check"
ALLOW, DENY, REVIEW = "allow", "deny", "review"
VERDICTS = (ALLOW, DENY, REVIEW)
# The enum numbers of risk.proto's Verdict.
_VERDICT_BY_NUMBER = {1: ALLOW, 2: DENY, 3: REVIEW}
_VERDICT_BY_NAME = {
    **{f"VERDICT_{v.upper()}": v for v in VERDICTS},
    **{v.upper(): v for v in VERDICTS},
    **{v: v for v in VERDICTS},
}
# A reason code goes to the access log and log lines: a long one is cut, and
# anything but [A-Za-z0-9_.:-] becomes "_" (no newlines, no lone surrogates
# that would fail a UTF-8 write, nothing that looks like a new field).
MAX_REASON = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def clean_reason(reason: str) -> str:
    return _UNSAFE.sub("_", reason[:MAX_REASON])


class BadReply(ValueError):
    """The risk service answered something that is not a CheckResponse with a verdict."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 4x, once per checked call
class CheckRequest:
    request_id: str = ""
    principal: str = ""
    source_service: str = ""
    source_unit: str = ""
    destination_service: str = ""
    method: str = ""
    path: str = ""
    protocol: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    body_truncated: bool = False
    listener: str = ""
    direction: str = ""
    mode: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    verdict: str  # allow | deny | review
    reason: str = ""


def encode_check(r: CheckRequest) -> bytes:
    """The CheckRequest as protobuf (field numbers of risk.proto)."""
    s = pb.string_field
    parts = [
        s(1, r.request_id), s(2, r.principal), s(3, r.source_service), s(4, r.source_unit),
        s(5, r.destination_service), s(6, r.method), s(7, r.path), s(8, r.protocol),
    ]
    for name, value in r.headers:
        parts.append(pb.message_field(9, pb.bytes_field(1, name) + pb.bytes_field(2, value)))
    parts += [
        pb.bytes_field(10, r.body), pb.uint_field(11, int(r.body_truncated)),
        s(12, r.listener), s(13, r.direction), s(14, r.mode),
    ]
    return b"".join(parts)


def encode_check_json(r: CheckRequest) -> bytes:
    """The proto3 JSON mapping of the CheckRequest (defaults left out, as the mapping allows).

    Written piece by piece with the json module's C string encoder, not by
    json.dumps of a dict: this runs once per checked call, and json.dumps cost
    about two and a half times as much.
    """
    q = _json_string
    parts = []
    for key, value in (
        ("requestId", r.request_id), ("principal", r.principal), ("sourceService", r.source_service),
        ("sourceUnit", r.source_unit), ("destinationService", r.destination_service), ("method", r.method),
        ("path", r.path), ("protocol", r.protocol),
    ):
        if value:
            parts.append(f'"{key}":{q(value)}')
    if r.headers:
        parts.append('"headers":[' + ",".join(
            f'{{"name":{q(n.decode("utf-8", "replace"))},"value":"{base64.b64encode(v).decode("ascii")}"}}'
            for n, v in r.headers) + "]")
    if r.body:
        parts.append(f'"body":"{base64.b64encode(r.body).decode("ascii")}"')
    if r.body_truncated:
        parts.append('"bodyTruncated":true')
    for key, value in (("listener", r.listener), ("direction", r.direction), ("mode", r.mode)):
        if value:
            parts.append(f'"{key}":{q(value)}')
    return ("{" + ",".join(parts) + "}").encode()


_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


# Reply bytes -> their Verdict. A risk service sends the same few replies again
# and again, and decoding is a pure function of the bytes: a bounded memo.
MEMO_ENTRIES = 1024
MEMO_MAX_INPUT = 256
_PROTO_SEEN: dict[bytes, Verdict] = {}
_JSON_SEEN: dict[bytes, Verdict] = {}


def _remember(memo: dict[bytes, Verdict], payload: bytes, verdict: Verdict) -> Verdict:
    if len(payload) <= MEMO_MAX_INPUT:
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()  # crude but bounded; the usual replies return at once
        memo[payload] = verdict
    return verdict


def decode_verdict(payload: bytes) -> Verdict:
    """A protobuf CheckResponse -> Verdict; BadReply if malformed or without a known verdict."""
    verdict = _PROTO_SEEN.get(payload)
    return verdict if verdict is not None else _remember(_PROTO_SEEN, payload, _decode_verdict(payload))


def decode_verdict_json(payload: bytes) -> Verdict:
    """The JSON mapping of a CheckResponse -> Verdict. The enum is accepted by name
    (VERDICT_DENY), by its short name (DENY, deny) or by number, as proto3 JSON parsers do."""
    verdict = _JSON_SEEN.get(payload)
    return verdict if verdict is not None else _remember(_JSON_SEEN, payload, _decode_verdict_json(payload))


def _decode_verdict(payload: bytes) -> Verdict:
    number = 0
    reason = ""
    try:
        for field, _, value in pb.fields(payload):
            if field == 1:
                number = pb.as_int(value, field)
            elif field == 2:
                reason = pb.as_string(value, field)
    except pb.DecodeError as e:
        raise BadReply(f"malformed CheckResponse: {e}") from None
    verdict = _VERDICT_BY_NUMBER.get(number)
    if verdict is None:
        raise BadReply(f"CheckResponse without a known verdict ({number})")
    return Verdict(verdict, clean_reason(reason))


def _decode_verdict_json(payload: bytes) -> Verdict:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested deep
        raise BadReply(f"reply is not JSON: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise BadReply("reply is not a JSON object")
    raw = doc.get("verdict")
    verdict = None
    if isinstance(raw, str):
        verdict = _VERDICT_BY_NAME.get(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        verdict = _VERDICT_BY_NUMBER.get(raw)
    if verdict is None:
        raise BadReply(f"reply without a known verdict ({raw!r})")
    reason = doc.get("reason", "")
    if not isinstance(reason, str):
        raise BadReply("reply reason is not a string")
    return Verdict(verdict, clean_reason(reason))
