"""A short soak (devstack.soak): about 150 mixed operations with faults thrown in at random, a fixed seed."""

import os
from collections import Counter

import pytest

from devstack.soak.engine import SMALL_SIZES, Soak, SoakConfig

pytestmark = [pytest.mark.integration, pytest.mark.docker]

# SOAK_SEED replays another run (the seed is printed with the figures).
# Seed 20 draws every kind of fault the loader's liveness is judged by (trickles, stalled clients) too.
SEED = int(os.environ.get("SOAK_SEED", "20"))


def test_short_soak_loses_nothing(tmp_path, stack, cdn_proxy, private_dockerd):
    """Reliability: about 150 mixed operations (cold, warm and parallel loads, uploads of new versions,
    logins of every role, unlocks, prefetches followed to their end, /downloads, /status, /metrics) under a
    cache budget that holds only part of the models, with faults drawn at random between them: the CDN cut
    mid-transfer, 503 bursts, truncated bodies, the Resource API slow, failing or answering garbage, an
    upload's small-part or manifest POST refused, a cached file altered, the loader killed and restarted in
    a prefetch, dockerd stopped and started, the CDN or the API trickling, clients that stop reading | no
    violation: every whole 200 load is a version an upload committed, every upload answered 200 loads
    afterwards, no 500, failures only while a fault is active, a 507 only without room, /downloads in shape
    and within the budget, an interrupted prefetch resumed, no unlock left running, /health never 503,
    stalled clients let go and every heal followed by a working load within its bound; with the faults
    healed every model loads and an unlock is ready"""
    config = SoakConfig(
        seed=SEED, ops=150, sizes=SMALL_SIZES, unlock_mib=4, fault_rate=0.15, checkpoint_every=30
    )
    report = Soak(config, tmp_path / "soak", stack, cdn_proxy, private_dockerd).run()
    figures = "\n".join(report.lines())
    print(figures)
    assert report.violations == [], figures
    kinds = {r.kind for r in report.records}
    assert {"load_warm", "load_cold", "upload", "login", "unlock", "status", "metrics"} <= kinds, figures
    assert {"prefetch", "prefetch_cold", "downloads"} <= kinds, figures
    after = Counter(r.kind for r in report.final)  # each of them ok, or it would be a violation
    assert (after["load_warm"], after["load_cold"], after["unlock"]) == (len(SMALL_SIZES),) * 2 + (1,), (
        figures
    )
    assert report.soak.episodes, figures  # faults were thrown in
