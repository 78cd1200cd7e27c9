"""HTTP field rules shared by the codecs and the filters (RFC 9110 5, RFC 9113 8.2).

Pure functions over bytes; no protocol state.
"""

from __future__ import annotations

import re

# RFC 9113 8.2.2: connection-specific header fields are malformed in HTTP/2.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# RFC 9110 5.1 token characters, lower-case only (RFC 9113 8.2.1).
NAME_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
# RFC 9110 5.6.2 token, any case: an HTTP method.
METHOD_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9113 8.2.1: no NUL, CR or LF anywhere, no whitespace at either end.
VALUE_BAD = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


def field_problem(name: bytes, value: bytes) -> str | None:
    """Why a regular (name, value) field is malformed in HTTP/2, or None."""
    if not NAME_OK.match(name):
        return f"invalid header name {name[:64]!r}"
    if VALUE_BAD.search(value):
        return f"invalid character or surrounding whitespace in the value of {name.decode('latin-1')}"
    if name in CONNECTION_SPECIFIC:
        return f"connection-specific header {name.decode()}"
    if name == b"te" and value != b"trailers":
        return "te other than 'trailers'"
    return None
