"""Route matching: first route whose match holds wins.

Knows: Route configs and a Call's path and headers. Must not: know clusters'
state or protocols' wire formats.
"""

from __future__ import annotations

import bisect
import random
import zlib

from meshproxy.call import Headers, header_value
from meshproxy.config import HeaderMatch, Route


class _Compiled:
    __slots__ = ("headers", "method_suffix", "path", "prefix", "route")

    def __init__(self, route: Route) -> None:
        self.route = route
        m = route.match
        self.prefix = m.prefix
        self.path = m.path
        # Thrift calls have the path "/service/method".
        self.method_suffix: str | None = None
        if m.service is not None and m.method is not None:
            self.path = f"/{m.service}/{m.method}"
        elif m.service is not None:
            self.prefix = f"/{m.service}/"
        elif m.method is not None:
            self.method_suffix = f"/{m.method}"
        self.headers = tuple(
            (h.name.encode(), h.exact.encode() if h.exact is not None else None,
             h.prefix.encode() if h.prefix is not None else None, h.present)
            for h in route.match.headers
        )


STICKY_SPACE = 1 << 20


class _Split:
    """A weighted route's clusters as cumulative weights: one bisect per call."""

    __slots__ = ("bounds", "names", "sticky", "total")

    def __init__(self, route: Route) -> None:
        self.names = [n for n, w in route.weighted if w > 0]
        self.bounds: list[int] = []
        total = 0
        for _, w in route.weighted:
            if w > 0:
                total += w
                self.bounds.append(total)
        self.total = total
        self.sticky = route.sticky_header.encode() if route.sticky_header else None

    def pick(self, headers: Headers) -> str:
        value = header_value(headers, self.sticky) if self.sticky is not None else None
        if value is None:
            return self.names[bisect.bisect_right(self.bounds, random.randrange(self.total))]
        # Sticky: the value's place in a fixed space, scaled to the weights, so the
        # same user keeps its version when the weights are rescaled (95/5 -> 950/50)
        # and only the users at the moving edge change when they shift.
        n = zlib.crc32(value) % STICKY_SPACE * self.total // STICKY_SPACE
        return self.names[bisect.bisect_right(self.bounds, n)]


class Router:
    """Routes of one listener, compiled once per config snapshot."""

    __slots__ = ("_routes", "_splits")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = tuple(_Compiled(r) for r in routes)
        self._splits = {id(r): _Split(r) for r in routes if r.weighted}

    def cluster_for(self, route: Route, headers: Headers) -> str:
        """The route's cluster; for a weighted route, this call's pick."""
        if not route.weighted:
            return route.cluster
        return self._splits[id(route)].pick(headers)

    def match(self, path: str, headers: Headers) -> Route | None:
        for r in self._routes:
            if r.path is not None:
                # The query string is not part of an exact path match.
                if path.partition("?")[0] != r.path:
                    continue
            elif r.prefix is not None and not path.startswith(r.prefix):
                continue
            if r.method_suffix is not None and not path.endswith(r.method_suffix):
                continue
            if r.headers and not _headers_match(r.headers, headers):
                continue
            return r.route
        return None


def _headers_match(
    rules: tuple[tuple[bytes, bytes | None, bytes | None, bool | None], ...], headers: Headers
) -> bool:
    for name, exact, prefix, present in rules:
        value = None
        for k, v in headers:
            if k == name:
                value = v
                break
        if present is not None:
            if (value is not None) != present:
                return False
        elif value is None:
            return False
        elif exact is not None and value != exact:
            return False
        elif prefix is not None and not value.startswith(prefix):
            return False
    return True


__all__ = ["HeaderMatch", "Router"]
