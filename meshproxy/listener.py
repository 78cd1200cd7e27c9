"""A listening socket and its downstream connections.

Knows: binding (TCP and unix sockets), accepting, the set of live
connections, draining them. Must not: know what a call does (the proxy's
handler does) or which direction it serves beyond the metric label.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

import trio

from meshproxy import shm, tls
from meshproxy.codec import thrift
from meshproxy.config import Listener as ListenerConfig
from meshproxy.config import Shm as ShmConfig
from meshproxy.config import alpn_for
from meshproxy.drivers.h2 import ServerLink
from meshproxy.drivers.thrift import ServerConnection
from meshproxy.drivers.transport import Transport
from meshproxy.filters.ratelog import RateLimitedLog
from meshproxy.metrics import Metrics
from meshproxy.proxy import HttpProxy, ListenerState
from meshproxy.thrift_proxy import ThriftProxy

log = logging.getLogger(__name__)

BACKLOG = 1024
# Out of file descriptors: wait this long before accepting again (trio's
# serve_listeners does the same), rather than spinning.
ACCEPT_PAUSE_ON_EMFILE = 0.1
_EMFILE = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class BindError(OSError):
    """A listener's address cannot be bound; the message names the listener."""


def bind(config: ListenerConfig, shm_options: ShmConfig) -> socket.socket:
    try:
        return _bind(config, shm_options)
    except OSError as e:
        raise BindError(
            e.errno, f"listener {config.name}: cannot listen on {config.address}: {e.strerror or e}"
        ) from None


def _bind(config: ListenerConfig, shm_options: ShmConfig) -> socket.socket:
    a = config.address
    if a.kind == "shm":
        sock = shm.listen(a.path, shm_options.directory or None)
    elif a.kind == "unix":
        try:
            if stat.S_ISSOCK(os.stat(a.path).st_mode):
                os.unlink(a.path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(a.path)
    else:
        family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class ListenerRuntime:
    def __init__(
        self, config: ListenerConfig, state: ListenerState, metrics: Metrics, shm_options: ShmConfig | None = None
    ) -> None:
        self.config = config
        self.shm_options = shm_options or ShmConfig()
        self.proxy: HttpProxy | ThriftProxy = ThriftProxy(state) if config.protocol == "thrift" else HttpProxy(state)
        self.metrics = metrics
        self.links: set[ServerLink | ServerConnection] = set()
        self.bound = ""
        self._sock: socket.socket | None = None
        self._accepting = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.tls = _server_tls(config)
        # A scanner or a misconfigured client retries fast: a few lines a minute, with counts.
        self._tls_log = RateLimitedLog(log)

    def _reload_tls(self, config: ListenerConfig) -> None:
        # Certificates are read again on every reload (rotated files take effect).
        try:
            self.tls = _server_tls(config)
        except (OSError, ValueError) as e:  # the files changed since the config was checked
            log.error("listener %s: TLS files not reloaded, the previous ones stay: %s", config.name, e)

    def __repr__(self) -> str:
        return f"<Listener {self.config.name} {self.bound} connections={len(self.links)}>"

    def swap(self, config: ListenerConfig, state: ListenerState) -> None:
        """New calls use the new state; calls in flight keep the one they began with."""
        self.config = config
        self.proxy.state = state
        self._reload_tls(config)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self._sock = bind(self.config, self.shm_options)
        name = sock.getsockname()
        if self.config.address.kind == "shm":
            self.bound = f"{self.config.address} ({name})"
        else:
            self.bound = f"unix:{name}" if isinstance(name, str) else f"{name[0]}:{name[1]}"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self.bound)
                with self._accepting:
                    await self._accept_loop(sock, nursery)
        finally:
            path = sock.getsockname() if sock.family == socket.AF_UNIX else None
            sock.close()
            if isinstance(path, str) and path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def _accept_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _EMFILE:
                        log.error("listener %s: accept: %s; pausing", self.config.name, os.strerror(e.errno or 0))
                        await trio.sleep(ACCEPT_PAUSE_ON_EMFILE)
                        break
                    raise
                nursery.start_soon(self._connection, conn)

    async def _connection(self, sock: socket.socket) -> None:
        c = self.config
        h = c.http2
        name = c.name
        m = self.metrics
        write_timeout = c.thrift.write_timeout if c.protocol == "thrift" else h.write_timeout
        transport: Transport | shm.ShmTransport
        try:
            if c.address.kind == "shm":
                channel = shm.accept(sock, self.shm_options.ring_size)
                transport = shm.ShmTransport(channel, write_timeout, shm.peer_of(sock, c.address.path))
            elif self.tls is not None:
                sock.setblocking(False)  # accept() hands back a blocking socket; the peek and handshake must not block
                secured = await self._secure(sock, write_timeout)
                if secured is None:
                    return
                transport = secured
            else:
                transport = Transport(sock, write_timeout)
        except OSError as e:
            if c.address.kind == "shm":
                log.warning("listener %s: shm handshake failed: %s", name, e)
            sock.close()
            return
        m.child(m.downstream_connections_security, name, transport.security).inc()
        errors = m.downstream_protocol_errors
        link: ServerLink | ServerConnection
        if isinstance(self.proxy, ThriftProxy):
            t = c.thrift
            link = ServerConnection(
                transport,
                thrift.Reader(
                    None if t.transport == "auto" else t.transport,
                    {"binary": thrift.BINARY, "compact": thrift.COMPACT}.get(t.protocol),
                    t.max_frame_size,
                    t.max_header_size,
                ),
                handler=self.proxy.handle,
                on_protocol_error=self.proxy.protocol_error,
                max_pending=t.max_pending_per_connection,
                idle_timeout=t.idle_timeout,
            )
        else:
            link = ServerLink(
            transport,
                handler=self.proxy.handle,
                max_concurrent_streams=h.max_concurrent_streams,
                max_header_list_size=h.max_header_list_size,
                stream_window=h.stream_window,
                connection_window=h.connection_window,
                keepalive_interval=h.keepalive_interval,
                keepalive_timeout=h.keepalive_timeout,
                idle_timeout=h.idle_timeout,
                on_protocol_error=lambda scope: m.child(errors, name, scope).inc(),
            )
        self.links.add(link)
        active = m.child(m.downstream_connections_active, name)
        m.child(m.downstream_connections, name).inc()
        active.inc()
        try:
            await link.serve()
        except Exception:
            log.exception("listener %s: connection from %s failed", name, transport.peer)
        finally:
            active.dec()
            self.links.discard(link)
            transport.close()

    async def _secure(self, sock: socket.socket, write_timeout: float) -> Transport | None:
        """TLS (or, in permissive mode, plaintext) for a new connection; None if it was refused or failed."""
        c, m = self.config, self.metrics
        server = self.tls
        assert server is not None
        result = m.tls_handshakes
        # A permissive port also serves plaintext clients, which may open a
        # connection and stay quiet (pools): they get the protocol's idle time.
        idle = c.thrift.idle_timeout if c.protocol == "thrift" else c.http2.idle_timeout
        peek_timeout = max(idle, c.tls.handshake_timeout) if c.tls.mode == "permissive" else c.tls.handshake_timeout
        try:
            try:
                is_tls = await tls.looks_like_tls(sock, peek_timeout)
            except (trio.TooSlowError, OSError):
                m.child(result, "downstream", c.name, "timeout").inc()
                sock.close()
                return None
            if is_tls is None:  # closed before a byte (a probe): nothing to count
                sock.close()
                return None
            if not is_tls:
                if c.tls.mode == "permissive":
                    return Transport(sock, write_timeout)
                m.child(result, "downstream", c.name, "plaintext_refused").inc()
                self._tls_log.log(logging.WARNING, "plaintext", "listener %s: refused a plaintext connection from %s "
                                  "(tls mode strict)", c.name, _peer_name(sock))
                await _refuse_plaintext(sock, c.protocol)
                return None
            try:
                transport = await tls.handshake(sock, server.context, server_side=True,
                                                timeout=c.tls.handshake_timeout, write_timeout=write_timeout)
            except tls.TlsError as e:
                m.child(result, "downstream", c.name, "failed").inc()
                self._tls_log.log(logging.WARNING, ("handshake", str(e)), "listener %s: TLS handshake from %s "
                                  "failed: %s", c.name, _peer_name(sock), e)
                sock.close()
                return None
        except BaseException:  # cancelled (drain, shutdown) mid-way
            sock.close()
            raise
        m.child(result, "downstream", c.name, "ok").inc()
        return transport

    def stop_accepting(self) -> None:
        self._accepting.cancel()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, GOAWAY every connection, wait for calls to finish (bounded)."""
        self.stop_accepting()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for link in list(self.links):
                    nursery.start_soon(link.close_gracefully, "draining", timeout)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _server_tls(config: ListenerConfig) -> tls.ServerTls | None:
    t = config.tls
    if t.mode == "disable":
        return None
    return tls.server_context(t.cert, t.key, t.ca, t.min_version, alpn_for(config.protocol))


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "-"


# RFC 9113 section 3.4's preface, then SETTINGS (empty) and GOAWAY(0, INADEQUATE_SECURITY):
# a plaintext HTTP/2 client is told why, instead of seeing a bare close.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REFUSAL_DEBUG = b"this listener requires TLS"
_H2_REFUSAL = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + (8 + len(_REFUSAL_DEBUG)).to_bytes(3, "big") + b"\x07\x00\x00\x00\x00\x00"
    + b"\x00\x00\x00\x00" + (0x0C).to_bytes(4, "big") + _REFUSAL_DEBUG
)


async def _refuse_plaintext(sock: socket.socket, protocol: str) -> None:
    try:
        if protocol == "http2":
            with trio.move_on_after(0.5):
                head = b""
                while len(head) < len(_H2_PREFACE) and _H2_PREFACE.startswith(head):
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        data = sock.recv(len(_H2_PREFACE) - len(head))
                    except BlockingIOError:
                        continue
                    if not data:
                        break
                    head += data
                if head == _H2_PREFACE:
                    sock.send(_H2_REFUSAL)
        # Closing with unread bytes would send a reset that can overtake the
        # GOAWAY: half-close, and read what the client still sends (bounded).
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(0.5):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    if not sock.recv(65536):
                        break
                except BlockingIOError:
                    continue
    except OSError:
        pass
    finally:
        sock.close()
