"""lifecycle: the app's start and stop; a stop lets the downloads in flight commit."""

from fastapi.testclient import TestClient

import lifecycle
import main
from tests.fakes import LOCAL, IdleCache, fake_services


def test_a_stop_lets_the_downloads_in_flight_commit(loader_env):
    # A load ends with its last byte, before its big part is hashed and committed: a stop waits for that.
    cache = IdleCache()
    main.use_services(lambda s: fake_services(cache=cache))
    with TestClient(main.app, base_url=LOCAL):
        assert main.services().cache is cache
        assert not cache.settled
    assert cache.settled == [lifecycle.SETTLE_SECONDS]
