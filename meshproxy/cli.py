"""`meshproxy --conf FILE [--check]`: argv -> config -> app; exit codes.

Exit codes: 0 clean stop (including after a drain), 2 bad config or usage,
1 anything else that stopped the proxy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from meshproxy import __version__
from meshproxy.config import ConfigError, load

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshproxy", description="A service-mesh data-plane sidecar.")
    p.add_argument("--conf", "-c", metavar="FILE", help="the YAML config file")
    p.add_argument("--check", action="store_true", help="validate the config, print it with defaults, exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("demo", help="run the proxy with an example backend and make a few calls")
    certs = sub.add_parser("dev-certs", help="write a throwaway CA and SPIFFE server/client certificates (dev only)")
    certs.add_argument("directory")
    certs.add_argument("--server", default="server", help="the server's service name (its SPIFFE id's last part)")
    certs.add_argument("--client", default="client", help="the client's service name")
    mirror = sub.add_parser("mirror", help="read mirrored calls").add_subparsers(dest="mirror_command", required=True)
    tail = mirror.add_parser("tail", help="print the records of a spool directory, one JSON per line")
    tail.add_argument("source", help="a spool directory, redis://HOST:PORT[/DB]#STREAM or nats://HOST:PORT#SUBJECT")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--protocol", choices=["http2", "grpc", "thrift"], help="only this protocol")
    tail.add_argument("--path-prefix", help="only calls whose path starts with this")
    tail.add_argument("--listener", help="only calls of this listener")
    rep = mirror.add_parser("replay", help="send the recorded calls to a target again, then print a summary")
    rep.add_argument("source", help="a spool directory, redis://HOST:PORT[/DB]#STREAM or nats://HOST:PORT#SUBJECT")
    rep.add_argument("--to", required=True, metavar="HOST:PORT", help="where to send them (h2c or Thrift)")
    rep.add_argument("--pace", choices=["original", "rate", "max"], default="max")
    rep.add_argument("--rate", type=float, default=100.0, help="calls per second with --pace rate")
    rep.add_argument("--limit", type=int, help="at most this many calls")
    rep.add_argument("--timeout", type=float, default=10.0, help="per call, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        from meshproxy.demo import run_demo

        return run_demo()
    if args.command == "dev-certs":
        from meshproxy import devcerts

        return devcerts.main(args.directory, args.server, args.client)
    if args.command == "mirror":
        from meshproxy import mirror_tools

        if args.mirror_command == "replay":
            return mirror_tools.replay(args.source, args.to, args.pace, args.rate, args.limit, args.timeout)
        return mirror_tools.tail(args.source, args.follow, args.protocol, args.path_prefix, args.listener)
    if not args.conf:
        print("meshproxy: --conf FILE is required (see --help)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load(args.conf)
    except ConfigError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(json.dumps(config.to_json(), indent=2))
        return EXIT_OK
    from meshproxy.app import App
    from meshproxy.listener import BindError

    async def run() -> None:
        app = App(config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.handle_signals)
            await app.run()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as e:
        oserror = _find(e, OSError)
        if oserror is None:
            raise
        print(f"meshproxy: {oserror.strerror if isinstance(oserror, BindError) else oserror}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _find(error: BaseException, kind: type[OSError]) -> OSError | None:
    """The first `kind` inside (possibly nested) exception groups."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None
