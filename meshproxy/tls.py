"""TLS for listeners and clusters: contexts, the handshake, and an encrypting transport.

Knows: Python's `ssl` (OpenSSL) through `SSLObject` and memory BIOs, the
same machinery trio.SSLStream drives; peer identities (SPIFFE URI SAN, then
DNS SAN, then CN); telling a TLS ClientHello from plaintext by its first
bytes. Must not: know HTTP/2 or Thrift beyond the ALPN names it is given.

Why not trio.SSLStream itself: the drivers write each frame straight from the
task that made it (meshproxy/drivers/transport.py), and SSLStream allows one
sender at a time behind a lock and a task switch. `TlsTransport` keeps that
design: it encrypts in place and hands ciphertext to the plain transport's
direct-write-or-backlog path, so TLS costs the cipher work and little else.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import trio

from meshproxy.drivers.transport import RECV_SIZE, Transport, TransportClosed

# A TLS record carrying a handshake (0x16), major version 3: every ClientHello
# from SSL 3.0 to TLS 1.3 starts so. No HTTP/2 preface ("PRI ") or sane
# Thrift frame does (as a frame length it would be over 369 MB).
TLS_HANDSHAKE_PREFIX = b"\x16\x03"
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Bytes of ciphertext pulled from the socket per read; OpenSSL hands back at
# most one 16 KiB record per SSLObject.read, so reads loop until it wants more.
_PLAIN_CHUNK = 64 * 1024


# OpenSSL's reason codes an operator meets most, in words.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate (mutual TLS is required)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate (mutual TLS)",
    "UNSUPPORTED_PROTOCOL": "the peer's TLS version is below this side's min_version",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
    "NO_SHARED_CIPHER": "no cipher suite in common",
}


class TlsError(Exception):
    """A handshake that failed; the message says why (for the log line)."""


class TlsConfigError(ValueError):
    """A certificate, key or CA bundle that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What a listener needs to accept TLS."""

    context: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a cluster needs to connect with TLS."""

    context: ssl.SSLContext
    server_name: str | None  # SNI and the name verified; None: the endpoint's host
    peer_identities: frozenset[str]  # when set: the server's identity must be one of these
    handshake_timeout: float = 5.0


def server_context(cert: str, key: str, ca: str = "", min_version: str = "1.2",
                   alpn: tuple[str, ...] = ()) -> ServerTls:
    """A listener's context; TlsConfigError names the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    # TLS 1.2 renegotiation: a client could make us redo handshakes (CPU) at will.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, cert, key)
    if ca:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    # Stateless session tickets would send extra records after every handshake
    # for resumption sidecars rarely use; one ticket keeps resumption possible.
    ctx.num_tickets = 1
    return ServerTls(ctx)


def client_context(mode: str, cert: str = "", key: str = "", ca: str = "", min_version: str = "1.2",
                   alpn: tuple[str, ...] = (), server_name: str = "",
                   peer_identities: tuple[str, ...] = (), handshake_timeout: float = 5.0) -> ClientTls:
    """A cluster's context (mode simple or mutual)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = VERSIONS[min_version]
    # A server's HelloRequest would make a write need a read, which this transport does not do.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if ca:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs()
    if mode == "mutual":
        _load_chain(ctx, cert, key)
    if peer_identities:
        # Mesh certificates often name a SPIFFE id and no host: check the
        # identity after the handshake instead of the host name.
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ClientTls(ctx, server_name or None, frozenset(peer_identities), handshake_timeout)


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise TlsConfigError(f"cannot read {e.filename or cert}: no such file") from None
    except ssl.SSLError as e:
        why = "the key does not match the certificate" if e.reason == "KEY_VALUES_MISMATCH" else (e.reason or str(e))
        raise TlsConfigError(f"cannot load certificate {cert} with key {key}: {why}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TlsConfigError(f"cannot read {ca}: no such file") from None
    except ssl.SSLError as e:
        raise TlsConfigError(f"cannot load CA bundle {ca}: {e.reason or e}") from None


def names(cert: dict[str, object] | None) -> list[str]:
    """Every name a verified certificate holds, in identity order: SPIFFE URI SANs, DNS SANs, CNs."""
    if not cert:
        return []
    sans = cert.get("subjectAltName") or ()
    out = [str(v) for k, v in sans if k == "URI" and str(v).startswith("spiffe://")]  # type: ignore[attr-defined]
    out += [str(v) for k, v in sans if k == "DNS"]  # type: ignore[attr-defined]
    for rdn in cert.get("subject") or ():  # type: ignore[attr-defined]
        out += [str(v) for k, v in rdn if k == "commonName"]
    return out


def identity(cert: dict[str, object] | None) -> str | None:
    """The peer's identity: its SPIFFE URI SAN, else its first DNS SAN, else its CN."""
    found = names(cert)
    return found[0] if found else None


async def looks_like_tls(sock: socket.socket, timeout: float) -> bool | None:
    """Peek at a new connection's first bytes: a TLS ClientHello (True), plaintext (False),
    or None if the peer closed before sending anything (a health probe, a port scan)."""
    pause = 0.001
    with trio.fail_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                head = sock.recv(len(TLS_HANDSHAKE_PREFIX), socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not head:
                return None
            if head[0] != TLS_HANDSHAKE_PREFIX[0] or len(head) >= len(TLS_HANDSHAKE_PREFIX):
                return head == TLS_HANDSHAKE_PREFIX
            # 0x16 alone so far: the second byte decides (readable stays true: poll, backing off).
            await trio.sleep(pause)
            pause = min(pause * 2, 0.1)


class TlsTransport(Transport):
    """A Transport that encrypts what it writes and decrypts what it reads."""

    __slots__ = ("_eof", "_in", "_out", "_shut", "_ssl")

    def __init__(self, sock: socket.socket, write_timeout: float, sslobj: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, high_water: int = 1 << 20) -> None:
        super().__init__(sock, write_timeout, high_water)
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._eof = False  # the peer's close_notify (or TCP close) was read
        self._shut = False  # our close_notify is queued: nothing may be written after it
        cert = sslobj.getpeercert()
        self.identity = identity(cert)
        self.security = "mutual_tls" if cert and sslobj.server_side else "tls"

    def peer_certificate(self) -> dict[str, object] | None:
        return self._ssl.getpeercert()  # type: ignore[return-value]

    async def recv(self) -> bytes:
        """The next plaintext; b"" at EOF (close_notify or a TCP close)."""
        while not self._eof:
            plain = self._decrypt()
            if plain is not None:
                return plain
            raw = await super().recv()
            if raw:
                self._in.write(raw)
            else:
                self._in.write_eof()
        return b""

    def _decrypt(self) -> bytes | None:
        """Plaintext already in the buffers, b"" at EOF, or None when more ciphertext is needed."""
        chunks: list[bytes] = []
        try:
            while True:
                data = self._ssl.read(_PLAIN_CHUNK)
                if not data:  # SSLObject.read gives b"" once the peer's close_notify is read
                    self._eof = True
                    break
                chunks.append(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as e:
            if isinstance(e, ssl.SSLEOFError):
                self._eof = True  # a TCP close without close_notify: the same to the protocol above
            elif not chunks:
                self.close(f"tls: {e.reason or e}")
                raise TransportClosed(self.closed_reason) from None
        self._flush_out()  # reading may have produced records to send (key updates, alerts)
        if chunks:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return b"" if self._eof else None

    def write(self, data: bytes) -> None:
        if self._closed or self._shut:
            return
        try:
            view = memoryview(data)
            while view:
                n = self._ssl.write(view)
                view = view[n:]
        except ssl.SSLError as e:
            self.close(f"tls: {e.reason or e}")
            return
        self._flush_out()

    def _flush_out(self) -> None:
        if self._out.pending:
            Transport.write(self, self._out.read())

    async def flush_and_close(self, timeout: float, reason: str) -> None:
        # What is queued goes first; close_notify after it, and nothing after that.
        with trio.move_on_after(timeout):
            await self.drained()
        if not self._closed and not self._shut:
            self._shut = True
            try:
                self._ssl.unwrap()  # queues close_notify; the peer's reply is not awaited
            except ssl.SSLError:
                pass
            self._flush_out()
        await super().flush_and_close(min(timeout, 1.0), reason)


async def handshake(sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, timeout: float,
                    write_timeout: float, server_name: str | None = None) -> TlsTransport:
    """Run the handshake on a connected non-blocking socket; TlsError says why it failed."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        sslobj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_name)
    except ValueError as e:  # e.g. no name to check the server's certificate against
        raise TlsError(str(e)) from None
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                await _send_all(sock, outgoing.read())
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    raise TlsError("the peer closed the connection during the handshake")
                incoming.write(data)
            await _send_all(sock, outgoing.read())
    except trio.TooSlowError:
        raise TlsError(f"handshake not done within {timeout:g}s") from None
    except ssl.SSLCertVerificationError as e:
        # The peer may want to hear why: send the alert OpenSSL queued.
        await _send_quietly(sock, outgoing.read())
        raise TlsError(f"certificate verify failed: {e.verify_message or e.reason}") from None
    except ssl.SSLError as e:
        await _send_quietly(sock, outgoing.read())
        raise TlsError(_REASONS.get(e.reason or "", e.reason or str(e))) from None
    except OSError as e:
        raise TlsError(e.strerror or str(e)) from None
    return TlsTransport(sock, write_timeout, sslobj, incoming, outgoing)


async def connect_upstream(sock: socket.socket, client: ClientTls, host: str, write_timeout: float) -> TlsTransport:
    """The client side: handshake, then the server's identity if the cluster names the ones it accepts."""
    transport = await handshake(sock, client.context, server_side=False, timeout=client.handshake_timeout,
                                write_timeout=write_timeout, server_name=client.server_name or host or None)
    if client.peer_identities and client.peer_identities.isdisjoint(names(transport.peer_certificate())):
        transport.close("unexpected server identity")
        raise TlsError(f"server identity {transport.identity!r} is not one of {sorted(client.peer_identities)}")
    return transport


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _send_quietly(sock: socket.socket, data: bytes) -> None:
    if not data:
        return
    with trio.move_on_after(0.5):
        try:
            await _send_all(sock, data)
        except OSError:
            pass
