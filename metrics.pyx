# cython: language_level=3, embedsignature=True
"""The loader's Prometheus metrics, all through prometheus_client: request counts and latencies recorded
as requests end, and the modules' own figures read when /metrics is scraped (the modules keep plain
counters and know nothing of Prometheus).

A scrape reads each module through one declared method, ``stats()``, which returns a plain dict of figures
(ints, a float, a string, one dict), and nothing else of it. Each figure's key is its metric's name without
``loader_`` (and a counter's ``_total``):

- ``Operations.stats()`` (operations; main.Services inherits it): ``{"bytes_loaded": int,
  "bytes_uploaded": int}``
- ``BigPartCache.stats()`` (model_cache): ``{"cache_hits", "cache_misses", "cdn_downloads",
  "blocks_handed_over", "cache_refetches", "cache_evictions", "cdn_bytes_resumed", "cache_bytes_used",
  "cache_bytes_max", "downloads_in_progress"}``, each an int
- ``ModelStore.stats()`` (binary_split, with ``signing.Trust.stats()``): ``{"format1_loads",
  "unsigned_manifest_loads", "signed_manifest_loads", "signature_refusals"}``, each an int
- ``Pools.stats()`` (workers): ``{"operations_in_progress": {kind: int}}``
- ``UnlockStatus.stats()`` (unlock_state): ``{"unlock_state": str, "unlock_duration_seconds": float}``
- ``Budget.stats()`` (heap.buffers): ``{"buffer_memory_free_bytes": int}``
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import heap
from constants import UNLOCK_STATES

COUNTER = "counter"
GAUGE = "gauge"

# The unlabelled figures, in the order a scrape shows them: (kind, key in the stats, help).
FIGURES = (
    (COUNTER, "bytes_loaded", "Decrypted bytes streamed by /load"),
    (COUNTER, "bytes_uploaded", "Plaintext bytes accepted by /upload"),
    (COUNTER, "cache_hits", "Loads served from the verified cache"),
    (COUNTER, "cache_misses", "Loads that needed the CDN"),
    (COUNTER, "cdn_downloads", "CDN downloads started"),
    (COUNTER, "blocks_handed_over",
     "Blocks of a download a load took from memory, not through the cache disk"),
    (COUNTER, "cache_refetches", "Cached big parts that failed a block check and were fetched again"),
    (COUNTER, "cache_evictions", "Committed big parts evicted to keep the cache within its disk budget"),
    (COUNTER, "cdn_bytes_resumed",
     "Bytes an interrupted download had verified, which its resumption did not fetch again"),
    (GAUGE, "cache_bytes_used", "Bytes of the committed big parts in the cache"),
    (GAUGE, "cache_bytes_max", "The cache's cap, MODEL_CACHE_MAX_BYTES (0: no cap but the disk)"),
    (GAUGE, "downloads_in_progress", "Downloads fetching or verifying a big part"),
    (COUNTER, "format1_loads", "Loads of resources without a manifest (format 1, unverified)"),
    (COUNTER, "unsigned_manifest_loads",
     "Loads and prefetches of resources whose manifest no publisher signed (section 9)"),
    (COUNTER, "signed_manifest_loads",
     "Loads and prefetches whose manifest a trusted publisher's signature verified"),
    (COUNTER, "signature_refusals", "Loads and prefetches refused: no trusted publisher signed the manifest"),
)
# The kinds of operation always shown, also when none is in progress.
OPERATION_KINDS = ("load", "login", "stream")


class Metrics:
    """One registry for the process. ``services()`` gives the wired modules whose figures a scrape
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
    """A custom collector: the figures of the loads, uploads, cache, downloads, workers, memory budget and
    unlock, as their ``stats()`` give them at the scrape."""

    def __init__(self, services):
        self._services = services

    def collect(self):
        svc = self._services()
        figures = {**svc.stats(), **svc.cache.stats(), **svc.store.stats()}
        for kind, key, help_text in FIGURES:
            if kind == COUNTER:
                yield CounterMetricFamily(f"loader_{key}_total", help_text, value=figures[key])
            else:
                yield GaugeMetricFamily(f"loader_{key}", help_text, value=figures[key])
        in_progress = svc.workers.stats()["operations_in_progress"]
        operations = GaugeMetricFamily("loader_operations_in_progress",
                                       "Operations in progress (see /status), by kind", labels=["kind"])
        for kind in sorted(set(in_progress) | set(OPERATION_KINDS)):
            operations.add_metric([kind], in_progress.get(kind, 0))
        yield operations
        yield GaugeMetricFamily(
            "loader_buffer_memory_free_bytes",
            "Room left in the one budget of the loads' and downloads' buffers (LOAD_MEMORY_BYTES)",
            value=heap.buffers.stats()["buffer_memory_free_bytes"])
        unlock = svc.unlock_status.stats()
        yield GaugeMetricFamily("loader_unlock_duration_seconds", "Duration of the last unlock",
                                value=unlock["unlock_duration_seconds"])
        state = GaugeMetricFamily("loader_unlock_state", "Current unlock state (1 for the current one)",
                                  labels=["state"])
        for name in UNLOCK_STATES:
            state.add_metric([name], int(name == unlock["unlock_state"]))
        yield state
