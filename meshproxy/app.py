"""The root: builds everything from a Config, runs it, reloads it, drains it.

Knows: the wiring (config -> clusters, filter chains, listeners, admin) and
the process lifecycle. Must not: handle calls itself.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Sequence

import trio
from prometheus_client import CollectorRegistry

from meshproxy import config as config_mod
from meshproxy import mirror
from meshproxy.accesslog import AccessLog
from meshproxy.admin import AdminSource, serve_admin
from meshproxy.codec.h2 import quiet_libraries
from meshproxy.config import Config, ConfigError
from meshproxy.filters import build_chain
from meshproxy.filters.base import Chain, Filter, FilterContext
from meshproxy.listener import ListenerRuntime
from meshproxy.metrics import Metrics
from meshproxy.mirror import Mirror
from meshproxy.proxy import ListenerState
from meshproxy.router import Router
from meshproxy.upstream.cluster import Cluster, ClusterManager

log = logging.getLogger(__name__)

# Young-generation GC runs every 700 allocations by default; a proxy
# allocates per frame, so that is thousands of collections a second for
# objects that die young anyway. Long-lived start-up objects are frozen.
GC_GEN0_THRESHOLD = 20_000


def _adopt(before: Sequence[Filter], after: Sequence[Filter]) -> None:
    """Let each filter of a reloaded chain take over the state of one it replaces:
    the first of the old chain's filters of its type that it accepts, each old one once."""
    left = list(before)
    for f in after:
        for old in left:
            if old.name == f.name and f.adopt(old):
                left.remove(old)
                break


def _route_filters(state: ListenerState) -> dict[str, list[Filter]]:
    """A state's route-level filters (its route chains less the listener's), by route name."""
    shared = len(state.chain.filters)
    chains = state.route_chains or {}
    return {r.name: chains[id(r)].filters[shared:] for r in state.config.routes if id(r) in chains}


class App:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics.create(self.registry)
        self.access_log = AccessLog(config.access_log, self.metrics)
        self.mirror = Mirror(config.mirror, self.metrics)
        self.listeners: dict[str, ListenerRuntime] = {}
        self.admin_address = ""
        self.version = 0
        self.draining = False
        self.ready = trio.Event()
        self._shutdown = trio.Event()
        self._clusters: ClusterManager | None = None
        self._nursery: trio.Nursery | None = None
        self._listener_nursery: trio.Nursery | None = None

    # -- building

    def _state(
        self, listener: config_mod.Listener, clusters: dict[str, Cluster], previous: ListenerState | None = None
    ) -> ListenerState:
        context = FilterContext(
            listener.name, listener.direction, self.config.node.service, self.config.node.unit, self.metrics, clusters
        )
        chain = build_chain(listener.filters, context)
        routes = [(r, build_chain(r.filters, context).filters) for r in listener.routes if r.filters]
        if previous is not None:
            _adopt(previous.chain.filters, chain.filters)
            before = _route_filters(previous)
            for r, filters in routes:
                _adopt(before.get(r.name, []), filters)
        route_chains = {id(r): Chain([*chain.filters, *filters]) for r, filters in routes}
        return ListenerState(
            config=listener,
            router=Router(listener.routes),
            chain=chain,
            route_chains=route_chains or None,
            clusters=clusters,
            access_log=self.access_log,
            metrics=self.metrics,
            node_service=self.config.node.service,
        )

    def _admin_source(self) -> AdminSource:
        return AdminSource(
            self.registry,
            ready=self._readiness,
            config_dump=lambda: {"version": self.version, "config": self.config.to_json()},
            clusters=lambda: [c.snapshot() for c in (self._clusters.clusters.values() if self._clusters else ())],
        )

    def _readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.ready.is_set():
            return False, "starting"
        return True, "ready"

    # -- running

    async def run(self, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
        quiet_libraries()
        self.access_log.open()
        try:
            async with trio.open_nursery() as root:
                self._nursery = root
                root.start_soon(self.access_log.run)
                mirror.install(self.mirror)
                self.admin_address = await root.start(serve_admin, self.config.admin.address, self._admin_source())
                async with trio.open_nursery() as upstream:
                    self._clusters = ClusterManager(upstream, self.metrics)
                    async with trio.open_nursery() as listeners:
                        self._listener_nursery = listeners
                        clusters, _ = self._clusters.update(self.config.clusters)
                        for lc in self.config.listeners:
                            await self._start_listener(lc, clusters)
                        self.version = 1
                        self.metrics.config_version.set(1)
                        self.metrics.config_last_reload_success.set(1)
                        self.ready.set()
                        gc.collect()
                        gc.freeze()
                        gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)
                        log.info("admin on %s; ready", self.admin_address)
                        task_status.started(self)
                        await self._shutdown.wait()
                        await self._drain()
                        listeners.cancel_scope.cancel()
                    await self.mirror.close(self.config.mirror.shutdown_timeout)
                    upstream.cancel_scope.cancel()
                root.cancel_scope.cancel()
        finally:
            self.mirror.abandon()  # after close(), a no-op
            self.access_log.close()
            if mirror.current() is self.mirror:
                mirror.install(None)

    async def _start_listener(self, lc: config_mod.Listener, clusters: dict[str, Cluster]) -> None:
        assert self._listener_nursery is not None
        runtime = ListenerRuntime(lc, self._state(lc, clusters), self.metrics, self.config.shm)
        bound = await self._listener_nursery.start(runtime.serve)
        self.listeners[lc.name] = runtime
        log.info("listener %s (%s, %s) on %s", lc.name, lc.direction, lc.protocol, bound)

    def shutdown(self) -> None:
        """Begin a graceful drain and exit (SIGTERM / SIGINT)."""
        self._shutdown.set()

    async def _drain(self) -> None:
        self.draining = True
        timeout = self.config.drain_timeout
        log.info("draining (up to %.1fs)", timeout)
        async with trio.open_nursery() as nursery:
            for runtime in self.listeners.values():
                nursery.start_soon(runtime.drain, timeout)
        log.info("drained")

    async def reload(self) -> bool:
        """Re-read the config file; swap it in if valid, else keep the old one."""
        try:
            new = config_mod.load(self.config.source)
            new_states = {lc.name: lc for lc in new.listeners}
            for lc in new.listeners:  # build chains first: a bad filter must not half-apply
                build_chain(lc.filters)
                for route in lc.routes:
                    build_chain(route.filters)
        except ConfigError as e:
            for line in e.lines:
                log.error("reload rejected: %s", line)
            self.metrics.config_reloads.labels("failure").inc()
            self.metrics.config_last_reload_success.set(0)
            return False
        assert self._clusters is not None and self._nursery is not None
        if new.admin != self.config.admin:
            log.warning("admin address changes take effect on restart only")
        if new.access_log != self.config.access_log:
            old_log = self.access_log
            self.access_log = AccessLog(new.access_log, self.metrics)
            self.access_log.open()
            self._nursery.start_soon(self.access_log.run)
            old_log.close()
        clusters, retired = self._clusters.update(new.clusters)
        for name, runtime in list(self.listeners.items()):
            kept = new_states.get(name)
            if kept is None or kept.address != runtime.config.address or kept.protocol != runtime.config.protocol:
                del self.listeners[name]
                self._nursery.start_soon(runtime.drain, new.drain_timeout)
            else:
                runtime.swap(kept, self._state(kept, clusters, runtime.proxy.state))
        for lc in new.listeners:
            if lc.name not in self.listeners:
                await self._start_listener(lc, clusters)
        for cluster in retired:
            self._nursery.start_soon(cluster.close, new.drain_timeout)
        self.config = new
        self.version += 1
        self.metrics.config_version.set(self.version)
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload_success.set(1)
        log.info("config version %d is live", self.version)
        return True

    async def handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.config.source)
                    await self.reload()
                else:
                    log.info("%s: draining", signal.Signals(signum).name)
                    self.shutdown()

