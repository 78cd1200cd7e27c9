"""Every metric meshproxy exports, declared once, on an injected registry.

Names follow Prometheus conventions (meshproxy_*, base units, _total); label
names follow Istio's standard metrics where one fits (response_code,
grpc_response_status, destination_service, source_workload). Label values are
bounded: listener, route and cluster names from the config, status codes,
and fixed reason strings; never a raw path, a peer address or an id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshproxy import __version__

# Request latency buckets in seconds: sub-millisecond for a local sidecar hop
# up to the 15 s default route timeout.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class MirrorCounts(Collector):
    """The mirror's record accounting, as plain integers read at scrape time.

    Mirroring counts three or four events per call; prometheus_client's
    locked counters would cost a microsecond each on the call path. Each
    count has one writer: the event loop counts what is handed in, queued,
    dropped before the queue and `discarded` (queued, then dropped at
    shutdown); the mirror's writer thread counts `written` and the
    `sink_down` drops. In flight is derived from one read of each, so every
    scrape sees sampled = written + dropped + in flight exactly.
    """

    DROP_REASONS = ("queue_full", "too_large", "sink_down", "shutdown")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sampled = self.enqueued = self.written = self.discarded = 0
        self.dropped = dict.fromkeys(self.DROP_REASONS, 0)
        registry.register(self)

    def collect(self) -> Any:
        sampled, enqueued, written, dropped_by_reason = self.sampled, self.enqueued, self.written, dict(self.dropped)
        in_flight = enqueued - written - dropped_by_reason["sink_down"] - self.discarded
        records = CounterMetricFamily(
            "meshproxy_mirror_records", "Mirrored records: sampled = written + dropped + in flight", labels=("result",)
        )
        for result, n in (("sampled", sampled), ("enqueued", enqueued), ("written", written)):
            records.add_metric((result,), n)
        dropped = CounterMetricFamily("meshproxy_mirror_dropped", "Mirrored records dropped, by reason",
                                      labels=("reason",))
        for reason, n in dropped_by_reason.items():
            dropped.add_metric((reason,), n)
        yield records
        yield dropped
        yield GaugeMetricFamily("meshproxy_mirror_in_flight", "Mirrored records queued or being written",
                                value=in_flight)


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    request_bytes: Counter
    response_bytes: Counter
    local_replies: Counter
    downstream_connections_active: Gauge
    downstream_connections: Counter
    downstream_streams_active: Gauge
    downstream_protocol_errors: Counter
    upstream_connections_active: Gauge
    upstream_connections: Counter
    upstream_streams_active: Gauge
    upstream_connect_failures: Counter
    upstream_protocol_errors: Counter
    config_version: Gauge
    config_reloads: Counter
    config_last_reload_success: Gauge
    access_log_dropped: Counter
    thrift_calls: Counter
    mirror: MirrorCounts
    mirror_sink_seconds: Histogram
    # Access control (filters/authz.py, filters/ticket.py): rule names come from
    # the config, results and actions from fixed sets, so the label sets are bounded.
    authz_decisions: Counter
    ticket_verifications: Counter
    tls_handshakes: Counter
    unit_decisions: Counter
    downstream_connections_security: Counter
    # The risk-control callout (filters/risk_control.py): verdicts, mode, reasons and
    # the cache result come from fixed sets; the service's reason codes are never labels.
    risk_verdicts: Counter
    risk_check_seconds: Histogram
    risk_failures: Counter
    risk_fail_open: Counter
    risk_fail_closed: Counter
    risk_report_dropped: Counter
    risk_cache_lookups: Counter
    # Governance: retries, breakers, outlier ejection, health checks (per cluster), and
    # the rate_limit and overload filters (per listener). Endpoint labels are the
    # config's endpoint addresses; priorities come from the overload filter's bounded range.
    retries: Counter
    retries_refused: Counter
    breaker_transitions: Counter
    breaker_rejected: Counter
    breakers_open: Gauge
    outlier_ejections: Counter
    endpoints_ejected: Gauge
    health_checks: Counter
    endpoint_healthy: Gauge
    rate_limited: Counter
    overload_shed: Counter
    overload_limit: Gauge
    overload_in_flight: Gauge
    overload_queue_seconds: Histogram
    # prometheus_client's .labels() hashes and validates on every call; the
    # label sets are bounded, so the children are cached here.
    _children: dict[Any, Any]

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        r = registry
        Info("meshproxy_build", "meshproxy version", registry=r).info({"version": __version__})
        call_labels = ("listener", "direction", "route", "destination_service")
        return cls(
            registry=r,
            requests=Counter(
                "meshproxy_requests", "Calls handled, by outcome",
                (*call_labels, "response_code", "grpc_response_status"), registry=r,
            ),
            request_duration=Histogram(
                "meshproxy_request_duration_seconds", "Call duration, first byte in to last byte out",
                call_labels, buckets=DURATION_BUCKETS, registry=r,
            ),
            request_bytes=Counter(
                "meshproxy_request_bytes", "Request body bytes received", ("listener",), registry=r,
            ),
            response_bytes=Counter(
                "meshproxy_response_bytes", "Response body bytes sent", ("listener",), registry=r,
            ),
            local_replies=Counter(
                "meshproxy_local_replies", "Calls answered by the proxy itself, by reason",
                ("listener", "reason"), registry=r,
            ),
            downstream_connections_active=Gauge(
                "meshproxy_downstream_connections_active", "Open downstream connections",
                ("listener",), registry=r,
            ),
            downstream_connections=Counter(
                "meshproxy_downstream_connections", "Downstream connections accepted",
                ("listener",), registry=r,
            ),
            downstream_streams_active=Gauge(
                "meshproxy_downstream_streams_active", "Calls in flight", ("listener",), registry=r,
            ),
            downstream_protocol_errors=Counter(
                "meshproxy_downstream_protocol_errors",
                "Downstream protocol violations (stream or connection errors sent)",
                ("listener", "scope"), registry=r,
            ),
            upstream_connections_active=Gauge(
                "meshproxy_upstream_connections_active", "Open upstream connections",
                ("destination_service",), registry=r,
            ),
            upstream_connections=Counter(
                "meshproxy_upstream_connections", "Upstream connections opened",
                ("destination_service",), registry=r,
            ),
            upstream_streams_active=Gauge(
                "meshproxy_upstream_streams_active", "Upstream streams open",
                ("destination_service",), registry=r,
            ),
            upstream_connect_failures=Counter(
                "meshproxy_upstream_connect_failures", "Failed upstream connection attempts",
                ("destination_service",), registry=r,
            ),
            upstream_protocol_errors=Counter(
                "meshproxy_upstream_protocol_errors", "Upstream protocol violations",
                ("destination_service",), registry=r,
            ),
            config_version=Gauge(
                "meshproxy_config_version", "Number of the live config (1 = loaded at start)",
                registry=r,
            ),
            config_reloads=Counter(
                "meshproxy_config_reloads", "Config reload attempts", ("result",), registry=r,
            ),
            config_last_reload_success=Gauge(
                "meshproxy_config_last_reload_success", "1 if the last reload succeeded", registry=r,
            ),
            access_log_dropped=Counter(
                "meshproxy_access_log_dropped", "Access log lines dropped (buffer full)", registry=r,
            ),
            thrift_calls=Counter(
                "meshproxy_thrift_calls", "Thrift calls by service, method and result "
                "(reply, exception, oneway, or the local reply's reason)",
                ("listener", "direction", "service", "method", "result"), registry=r,
            ),
            mirror=MirrorCounts(r),
            mirror_sink_seconds=Histogram(
                "meshproxy_mirror_sink_seconds", "Time to write one batch to the mirror sink",
                buckets=DURATION_BUCKETS, registry=r,
            ),
            authz_decisions=Counter(
                "meshproxy_authz_decisions", "authz decisions, by the rule that decided ('default' if none "
                "matched), its action (allow|deny) and whether the filter only observes (dry_run)",
                ("listener", "rule", "action", "dry_run"), registry=r,
            ),
            ticket_verifications=Counter(
                "meshproxy_ticket_verifications", "Service tickets verified, by result "
                "(ok|expired|invalid|missing) and the action taken (allow|deny|dry_run)",
                ("listener", "result", "action"), registry=r,
            ),
            tls_handshakes=Counter(
                "meshproxy_tls_handshakes", "TLS handshakes by side (downstream: a listener's, upstream: a "
                "cluster's), target (the listener or cluster) and result (ok, failed, timeout, plaintext_refused)",
                ("side", "target", "result"), registry=r,
            ),
            unit_decisions=Counter(
                "meshproxy_unit_decisions", "unit_routing decisions by unit, target cluster and reason (table, "
                "hash, range, direct, gray, failover, default, observe, no_key)",
                ("listener", "unit", "target", "reason"), registry=r,
            ),
            downstream_connections_security=Counter(
                "meshproxy_downstream_connections_security", "Downstream connections by how they are "
                "protected: mutual_tls, tls, plaintext or shm", ("listener", "security"), registry=r,
            ),
            risk_verdicts=Counter(
                "meshproxy_risk_verdicts", "risk_control verdicts (allow, deny, review) by mode (enforce, "
                "report), whether from the risk service or the verdict cache", ("listener", "mode", "verdict"),
                registry=r,
            ),
            risk_check_seconds=Histogram(
                "meshproxy_risk_check_seconds", "Time of one call to the risk service, verdict or failure",
                ("listener",), buckets=DURATION_BUCKETS, registry=r,
            ),
            risk_failures=Counter(
                "meshproxy_risk_failures", "Checks without a verdict, by reason (timeout, unavailable, "
                "bad_reply, guard_open: not sent while the guard is open)", ("listener", "reason"), registry=r,
            ),
            risk_fail_open=Counter(
                "meshproxy_risk_fail_open", "Calls let through because their check failed (failure_mode: allow)",
                ("listener",), registry=r,
            ),
            risk_fail_closed=Counter(
                "meshproxy_risk_fail_closed", "Calls refused because their check failed (failure_mode: deny)",
                ("listener",), registry=r,
            ),
            risk_report_dropped=Counter(
                "meshproxy_risk_report_dropped", "Report-mode checks dropped: the report queue was full",
                ("listener",), registry=r,
            ),
            risk_cache_lookups=Counter(
                "meshproxy_risk_cache_lookups", "risk_control verdict cache lookups by result (hit, miss)",
                ("listener", "result"), registry=r,
            ),
            retries=Counter(
                "meshproxy_upstream_retries", "Upstream attempts after the first, by the condition retried",
                ("destination_service", "condition"), registry=r,
            ),
            retries_refused=Counter(
                "meshproxy_upstream_retries_refused", "Retries that were due but not made, by reason (budget, "
                "max_retries, deadline, body_too_large, not_idempotent)", ("destination_service", "reason"), registry=r,
            ),
            breaker_transitions=Counter(
                "meshproxy_breaker_transitions", "Error breakers changing state (to: open, half_open, closed)",
                ("destination_service", "to"), registry=r,
            ),
            breaker_rejected=Counter(
                "meshproxy_breaker_rejected", "Calls refused without touching the upstream, by reason (open, "
                "max_requests, max_pending, max_connections)", ("destination_service", "reason"), registry=r,
            ),
            breakers_open=Gauge(
                "meshproxy_breakers_open", "Error breakers open or half-open now (one per key)",
                ("destination_service",), registry=r,
            ),
            outlier_ejections=Counter(
                "meshproxy_outlier_ejections", "Endpoints ejected by outlier detection, by reason "
                "(consecutive_errors; skipped_max_percent when the cap kept it in)", ("destination_service", "reason"),
                registry=r,
            ),
            endpoints_ejected=Gauge(
                "meshproxy_endpoints_ejected", "Endpoints ejected now", ("destination_service",), registry=r,
            ),
            health_checks=Counter(
                "meshproxy_health_checks", "Active health checks by result (ok, failed, timeout, connect_failed)",
                ("destination_service", "result"), registry=r,
            ),
            endpoint_healthy=Gauge(
                "meshproxy_endpoint_healthy", "1 if the endpoint passes its active health checks, 0 if not",
                ("destination_service", "endpoint"), registry=r,
            ),
            rate_limited=Counter(
                "meshproxy_rate_limited", "Calls refused by a rate_limit filter, by the filter's limit name",
                ("listener", "limit"), registry=r,
            ),
            overload_shed=Counter(
                "meshproxy_overload_shed", "Calls the overload filter refused, by priority and reason "
                "(limit, queue_timeout, queue_full, cpu, qps, deadline, client_gone)",
                ("listener", "priority", "reason"), registry=r,
            ),
            overload_limit=Gauge(
                "meshproxy_overload_limit", "The overload filter's adaptive concurrency limit now",
                ("listener",), registry=r,
            ),
            overload_in_flight=Gauge(
                "meshproxy_overload_in_flight", "Calls the overload filter dispatched that have not finished",
                ("listener",), registry=r,
            ),
            overload_queue_seconds=Histogram(
                "meshproxy_overload_queue_seconds", "Time a call waited in the overload filter before dispatch",
                ("listener",), buckets=DURATION_BUCKETS, registry=r,
            ),
            _children={},
        )

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c
