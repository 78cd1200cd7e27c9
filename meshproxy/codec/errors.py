"""Errors shared by the Thrift codecs (sans-IO)."""

from __future__ import annotations


class ThriftError(Exception):
    """Malformed bytes: the connection is closed (after a reply if the seqid is known)."""

    def __init__(self, message: str, seqid: int | None = None) -> None:
        super().__init__(message)
        self.seqid = seqid


class Incomplete(Exception):
    """More bytes are needed; `need` is a lower bound on the total length."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need
