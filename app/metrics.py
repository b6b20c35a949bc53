"""Prometheus metrics: one registry per app, nothing global.

``Metrics`` owns the registry and the counters and histograms that events
update (HTTP requests, DIMSE operations); the state that already exists
elsewhere (association pools, the cache) is read at scrape time by a custom
collector, so it can never drift from what ``/pacs`` shows.

Names (all prefixed ``dimse_gateway_``):

- ``http_requests_total{method,route,status}``, ``http_request_duration_seconds{method,route}``
  (until the last body byte), ``http_response_bytes_total{route}``; ``route`` is the
  route template (``/dicomweb/studies/{study}``), ``unmatched`` for unknown paths.
- ``dimse_operations_total{node,operation,status}`` and
  ``dimse_operation_duration_seconds{node,operation}``: operation is C-FIND, C-MOVE,
  C-GET, C-ECHO or "C-STORE received"; status is the category of the final
  status (success, warning, failure, cancel) or ``none`` when there was no
  answer (abort, timeout, lost association).  C-STOREs received for a C-MOVE are
  counted (accepted ones) without a duration: the storage process receives them.
- ``pool_associations{node,state}`` (in_use, idle), ``pool_waiting{node}``,
  ``pool_max_associations{node}``, ``pool_opened_total{node}``,
  ``pool_failed_opens_total{node}``, ``pool_discarded_total{node}``.
- ``cache_bytes``, ``cache_max_bytes``, ``cache_lookups_total{kind,result}``
  (kind instance, series or metadata (an instance's DICOM JSON in memory), result
  hit or miss), ``retrieve_moves_started_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.dimse.observed_sink import OPERATION as RECEIVED
from app.dimse.status import category
from app.runtime import Gateway

PREFIX = "dimse_gateway_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def status_category(status: int | None) -> str:
    return "none" if status is None else category(status).value


class Metrics:
    """The app's registry and the instruments request handling updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request time until the last body byte was sent",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_bytes = Counter(
            PREFIX + "http_response_bytes",
            "Response body bytes sent (streamed retrieves included)",
            ["route"],
            registry=r,
        )
        self.dimse_operations = Counter(
            PREFIX + "dimse_operations",
            "DIMSE operations by node, type and final status category",
            ["node", "operation", "status"],
            registry=r,
        )
        self.dimse_duration = Histogram(
            PREFIX + "dimse_operation_duration_seconds",
            "DIMSE operation time, request to final response",
            ["node", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def observe_http(
        self, method: str, route: str, status: int, seconds: float, body_bytes: int
    ) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)
        if body_bytes:
            self.http_bytes.labels(route).inc(body_bytes)

    def observe_dimse(
        self, node: str, operation: str, status: int | None, seconds: float | None
    ) -> None:
        self.dimse_operations.labels(node, operation, status_category(status)).inc()
        if seconds is not None:
            self.dimse_duration.labels(node, operation).observe(seconds)

    def watch(self, gateway: Callable[[], Gateway | None]) -> None:
        """Collect pool and cache state from the gateway *gateway()* returns at scrape time."""
        self.registry.register(_GatewayCollector(gateway))

    def instrument(self, gateway: Gateway) -> None:
        """Hook the gateway's pools and storage process up to the DIMSE metrics (before start).

        C-GET arrivals are observed in the pool's C-GET (status and time of each);
        C-MOVE arrivals by the storage process, which reports every C-STORE it
        answered (refusals included) with the sender's AE title, the status and
        the time from request to checked file.
        """
        for pool in gateway.pools.values():
            pool.observer = self.observe_dimse
        names: dict[str, str] = {}
        for node in reversed(gateway.settings.nodes):
            names[node.ae_title] = node.name

        def stored(calling_ae: str, status: int, seconds: float | None) -> None:
            self.observe_dimse(names.get(calling_ae, calling_ae), RECEIVED, status, seconds)

        gateway.storage.observer = stored

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GatewayCollector(Collector):
    def __init__(self, gateway: Callable[[], Gateway | None]) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway()
        if gateway is None:
            return
        associations = GaugeMetricFamily(
            PREFIX + "pool_associations", "Associations per node", labels=["node", "state"]
        )
        waiting = GaugeMetricFamily(
            PREFIX + "pool_waiting", "Requests waiting for an association", labels=["node"]
        )
        limit = GaugeMetricFamily(
            PREFIX + "pool_max_associations", "Configured association limit", labels=["node"]
        )
        opened = CounterMetricFamily(PREFIX + "pool_opened", "Associations opened", labels=["node"])
        failed = CounterMetricFamily(
            PREFIX + "pool_failed_opens", "Associations that could not be opened", labels=["node"]
        )
        discarded = CounterMetricFamily(
            PREFIX + "pool_discarded", "Associations released or aborted", labels=["node"]
        )
        for name, pool in gateway.pools.items():
            state = pool.state()
            associations.add_metric([name, "in_use"], state.in_use)
            associations.add_metric([name, "idle"], state.idle)
            waiting.add_metric([name], state.waiting)
            limit.add_metric([name], state.max_associations)
            opened.add_metric([name], state.opened_total)
            failed.add_metric([name], state.failed_opens)
            discarded.add_metric([name], state.discarded_total)
        yield from (associations, waiting, limit, opened, failed, discarded)

        cache = gateway.cache
        yield GaugeMetricFamily(
            PREFIX + "cache_bytes", "Bytes in the instance cache", value=cache.size_bytes
        )
        yield GaugeMetricFamily(
            PREFIX + "cache_max_bytes", "Instance cache bound", value=cache.max_bytes
        )
        lookups = CounterMetricFamily(
            PREFIX + "cache_lookups", "Instance cache lookups", labels=["kind", "result"]
        )
        for kind in ("instance", "series"):
            for result in ("hit", "miss"):
                lookups.add_metric([kind, result], cache.lookups[kind, result])
        lookups.add_metric(["metadata", "hit"], gateway.metadata.hits)
        lookups.add_metric(["metadata", "miss"], gateway.metadata.misses)
        yield lookups
        yield CounterMetricFamily(
            PREFIX + "retrieve_moves_started",
            "Retrieves (C-MOVE or C-GET) started by the gateway",
            value=gateway.retriever.moves_started,
        )
