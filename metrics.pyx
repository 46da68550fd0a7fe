# cython: language_level=3, embedsignature=True
"""The loader's Prometheus metrics, all through prometheus_client: request counts and latencies recorded
as requests end, and the modules' own counters read when /metrics is scraped (the modules keep plain
counters and know nothing of Prometheus)."""

from collections import Counter as Tally

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import heap
from unlock_state import STATES


class Metrics:
    """One registry for the process. ``services()`` gives the wired modules whose counters a scrape
    reads."""

    def __init__(self, services):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loader_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "loader_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.registry.register(ServiceCounters(services))

    def observe(self, method, route, status, seconds):
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self):
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ServiceCounters:
    """A custom collector: the counters of the loads, uploads, cache, downloads and unlock, as they are at
    the scrape."""

    def __init__(self, services):
        self._services = services

    def collect(self):
        svc = self._services()
        yield _counter("loader_bytes_loaded_total", "Decrypted bytes streamed by /load", svc.bytes_loaded)
        yield _counter("loader_bytes_uploaded_total", "Plaintext bytes accepted by /upload", svc.bytes_uploaded)
        yield _counter("loader_cache_hits_total", "Loads served from the verified cache", svc.cache.hits)
        yield _counter("loader_cache_misses_total", "Loads that needed the CDN", svc.cache.misses)
        yield _counter("loader_cdn_downloads_total", "CDN downloads started", svc.cache.downloads)
        yield _counter("loader_blocks_handed_over_total",
                       "Blocks of a download a load took from memory, not through the cache disk", svc.cache.handed)
        yield _counter("loader_cache_refetches_total",
                       "Cached big parts that failed a block check and were fetched again", svc.cache.refetches)
        yield _counter("loader_cache_evictions_total",
                       "Committed big parts evicted to keep the cache within its disk budget", svc.cache.evictions)
        yield _counter("loader_cdn_bytes_resumed_total",
                       "Bytes an interrupted download had verified, which its resumption did not fetch again",
                       svc.cache.bytes_resumed)
        usage = svc.cache.usage()
        yield GaugeMetricFamily("loader_cache_bytes_used", "Bytes of the committed big parts in the cache",
                                value=usage["bytesUsed"])
        yield GaugeMetricFamily("loader_cache_bytes_max",
                                "The cache's cap, MODEL_CACHE_MAX_BYTES (0: no cap but the disk)",
                                value=usage["bytesMax"])
        fetching = sum(t["state"] in ("fetching", "verifying") for t in svc.cache.transfers())
        yield GaugeMetricFamily("loader_downloads_in_progress", "Downloads fetching or verifying a big part",
                                value=fetching)
        yield _counter("loader_format1_loads_total",
                       "Loads of resources without a manifest (format 1, unverified)", svc.store.format1_loads)
        trust = svc.store.trust
        yield _counter("loader_unsigned_manifest_loads_total",
                       "Loads and prefetches of resources whose manifest no publisher signed (section 9)",
                       trust.unsigned_loads)
        yield _counter("loader_signed_manifest_loads_total",
                       "Loads and prefetches whose manifest a trusted publisher's signature verified",
                       trust.signed_loads)
        yield _counter("loader_signature_refusals_total",
                       "Loads and prefetches refused: no trusted publisher signed the manifest", trust.refusals)
        operations = GaugeMetricFamily("loader_operations_in_progress",
                                       "Operations in progress (see /status), by kind", labels=["kind"])
        kinds = Tally(op["kind"] for op in svc.workers.operations())
        for kind in sorted(set(kinds) | {"load", "login", "stream"}):
            operations.add_metric([kind], kinds[kind])
        yield operations
        yield GaugeMetricFamily(
            "loader_buffer_memory_free_bytes",
            "Room left in the one budget of the loads' and downloads' buffers (LOAD_MEMORY_BYTES)",
            value=heap.buffers.left)
        yield GaugeMetricFamily("loader_unlock_duration_seconds", "Duration of the last unlock",
                                value=svc.unlock_status.duration or 0.0)
        current = svc.unlock_status.snapshot()["state"]
        state = GaugeMetricFamily("loader_unlock_state", "Current unlock state (1 for the current one)",
                                  labels=["state"])
        for name in STATES:
            state.add_metric([name], int(name == current))
        yield state


def _counter(name, help_text, value):
    return CounterMetricFamily(name, help_text, value=value)
