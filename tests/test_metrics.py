"""metrics: /metrics reads the modules' counters and gauges at each scrape, the cache's off the event loop."""

import main
from tests.fakes import GIB


def test_metrics_read_the_modules_counters_at_each_scrape(client):
    from prometheus_client.parser import text_string_to_metric_families

    from unlock_state import STATES

    def scrape():
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    svc = main.services()
    client.get("/health")
    svc.bytes_loaded, svc.bytes_uploaded = 5_000_000_123, 7
    svc.cache.hits, svc.cache.misses, svc.cache.downloads, svc.cache.refetches = 3, 4, 5, 6
    svc.store.format1_loads = 8
    trust = svc.store.trust
    trust.unsigned_loads, trust.signed_loads, trust.refusals = 11, 12, 13
    svc.cache.bytes_resumed = 10
    families = scrape()
    counters = {
        "loader_bytes_loaded": 5_000_000_123,
        "loader_bytes_uploaded": 7,
        "loader_cache_hits": 3,
        "loader_cache_misses": 4,
        "loader_cdn_downloads": 5,
        "loader_cache_refetches": 6,
        "loader_format1_loads": 8,
        "loader_unsigned_manifest_loads": 11,
        "loader_signed_manifest_loads": 12,
        "loader_signature_refusals": 13,
        "loader_cache_evictions": 0,  # a fresh cache has evicted nothing
        "loader_cdn_bytes_resumed": 10,
    }
    for family, value in counters.items():
        assert families[family].type == "counter"
        samples = [(s.name, s.labels, s.value) for s in families[family].samples]
        assert samples == [(family + "_total", {}, value)]
    assert families["loader_unlock_duration_seconds"].type == "gauge"
    assert [s.value for s in families["loader_unlock_duration_seconds"].samples] == [0.0]
    state = families["loader_unlock_state"]
    assert state.type == "gauge"
    assert {s.labels["state"]: s.value for s in state.samples} == {s: float(s == "idle") for s in STATES}
    health = [s for s in families["loader_requests"].samples if s.labels.get("route") == "/health"]
    assert families["loader_requests"].type == "counter" and health and health[0].value >= 1
    assert families["loader_request_seconds"].type == "histogram"

    svc.cache.hits += 1  # read at the scrape, not copied when the metrics were made
    assert scrape()["loader_cache_hits"].samples[0].value == 4
    ops = {s.labels["kind"]: s.value for s in families["loader_operations_in_progress"].samples}
    assert ops == {"load": 0, "login": 0, "stream": 0}
    stream = svc.workers.begin("stream", "models/m.bin")
    ops = {s.labels["kind"]: s.value for s in scrape()["loader_operations_in_progress"].samples}
    assert ops["stream"] == 1
    svc.workers.end(stream)
    import heap

    free = families["loader_buffer_memory_free_bytes"]
    assert free.type == "gauge" and free.samples[0].value == heap.buffers.left
    assert "loader_load_memory_free_bytes" not in families
    for gauge in ("loader_cache_bytes_used", "loader_cache_bytes_max", "loader_downloads_in_progress"):
        assert families[gauge].type == "gauge"
    assert [s.value for s in families["loader_downloads_in_progress"].samples] == [0]


def test_metrics_show_the_cache_budget_evictions_resumed_bytes_and_downloads_in_progress(prefetching):
    from prometheus_client.parser import text_string_to_metric_families

    client, _, cache = prefetching
    r = client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(name, kind):
        assert families[name].type == kind, name
        [sample] = families[name].samples
        return sample.value

    assert value("loader_cache_bytes_used", "gauge") == 5 * GIB
    assert value("loader_cache_bytes_max", "gauge") == 10 * GIB
    assert value("loader_downloads_in_progress", "gauge") == 2  # fetching and verifying; not cached, failed
    assert value("loader_cache_evictions", "counter") == 2
    assert value("loader_cdn_bytes_resumed", "counter") == 3 * 2**20
    assert cache.on_loop and not any(cache.on_loop)  # the scrape reads the disk off the event loop
