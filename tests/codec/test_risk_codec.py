"""The hand-written protobuf codec and the risk messages, checked against the
protobuf runtime and the code protoc generated from proto/meshproxy/risk/v1/risk.proto."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.codec import protobuf as pb
from meshproxy.codec import risk
from tests.peers.gen import risk_pb2

text = st.text(max_size=40)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-.0123456789", min_size=1, max_size=20)
requests = st.builds(
    risk.CheckRequest,
    request_id=text, principal=text, source_service=text, source_unit=text, destination_service=text,
    method=text, path=text, protocol=text,
    headers=st.lists(st.tuples(names.map(str.encode), st.binary(max_size=30)), max_size=5).map(tuple),
    body=st.binary(max_size=100), body_truncated=st.booleans(), listener=text, direction=text, mode=text,
)


def as_pb(r: risk.CheckRequest) -> risk_pb2.CheckRequest:
    return risk_pb2.CheckRequest(
        request_id=r.request_id, principal=r.principal, source_service=r.source_service, source_unit=r.source_unit,
        destination_service=r.destination_service, method=r.method, path=r.path, protocol=r.protocol,
        headers=[risk_pb2.Header(name=n.decode(), value=v) for n, v in r.headers],
        body=r.body, body_truncated=r.body_truncated, listener=r.listener, direction=r.direction, mode=r.mode,
    )


@given(requests)
def test_check_request_is_what_protoc_code_reads(r: risk.CheckRequest) -> None:
    encoded = risk.encode_check(r)
    assert risk_pb2.CheckRequest.FromString(encoded) == as_pb(r)
    # The runtime writes fields in number order and leaves defaults out, as we do.
    assert encoded == as_pb(r).SerializeToString()


@given(requests)
def test_json_form_is_the_proto3_json_mapping(r: risk.CheckRequest) -> None:
    parsed = json_format.Parse(risk.encode_check_json(r), risk_pb2.CheckRequest())
    assert parsed == as_pb(r)


@given(st.sampled_from([1, 2, 3]), text, st.integers(min_value=0, max_value=2**32))
def test_verdicts_written_by_the_runtime_are_read(number: int, reason: str, unknown: int) -> None:
    reply = risk_pb2.CheckResponse(verdict=number, reason=reason).SerializeToString()
    # A field this side does not know (a newer service) is skipped.
    reply += pb.uint_field(7, unknown) + pb.string_field(8, "later")
    v = risk.decode_verdict(reply)
    assert v == risk.Verdict(("allow", "deny", "review")[number - 1], risk.clean_reason(reason))
    as_json = json_format.MessageToJson(risk_pb2.CheckResponse(verdict=number, reason=reason)).encode()
    assert risk.decode_verdict_json(as_json) == v


def test_reason_codes_are_cleaned_and_deep_json_is_a_bad_reply() -> None:
    # A lone surrogate would fail the access log's UTF-8 write; a newline would fake a log line.
    v = risk.decode_verdict_json(b'{"verdict": "DENY", "reason": "a\\ud800b\\nc d"}')
    assert v.reason == "a_b_c_d"
    assert risk.clean_reason("fraud.score:high-9_x") == "fraud.score:high-9_x"
    with pytest.raises(risk.BadReply):
        risk.decode_verdict_json(b"[" * 100_000)


@pytest.mark.parametrize("doc", [
    {"verdict": "DENY"}, {"verdict": "deny"}, {"verdict": 2}, {"verdict": "VERDICT_DENY", "reason": ""},
])
def test_json_verdict_spellings(doc: dict[str, object]) -> None:
    assert risk.decode_verdict_json(json.dumps(doc).encode()).verdict == "deny"


@pytest.mark.parametrize("payload", [
    b"",  # no verdict: VERDICT_UNSPECIFIED
    risk_pb2.CheckResponse(verdict=0, reason="x").SerializeToString(),
    pb.uint_field(1, 9),  # an enum value this side does not know
    b"\x0a\x05ab",  # field 1 as a string, truncated
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # an 11-byte varint
    b"\x0b",  # a group: a wire type the format deprecated
])
def test_bad_protobuf_replies(payload: bytes) -> None:
    with pytest.raises(risk.BadReply):
        risk.decode_verdict(payload)


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"verdict": "maybe"}', b'{"verdict": true}',
                                     b'{"verdict": "ALLOW", "reason": 5}', b"\xff"])
def test_bad_json_replies(payload: bytes) -> None:
    with pytest.raises(risk.BadReply):
        risk.decode_verdict_json(payload)


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_varints_round_trip(n: int) -> None:
    value, end = pb.read_varint(pb.varint(n), 0)
    assert value == n & ((1 << 64) - 1) and end == len(pb.varint(n))


@given(st.binary(max_size=200))
def test_the_decoder_never_fails_other_than_with_decode_error(data: bytes) -> None:
    try:
        list(pb.fields(data))
    except pb.DecodeError:
        pass


def test_a_long_reason_is_cut() -> None:
    reply = risk_pb2.CheckResponse(verdict=2, reason="r" * 1000).SerializeToString()
    assert risk.decode_verdict(reply).reason == "r" * risk.MAX_REASON
