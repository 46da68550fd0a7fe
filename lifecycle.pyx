# cython: language_level=3, embedsignature=True
"""The process's start and stop (the app's lifespan): the Services are built in the background at start, so
/health answers at once; on a stop the downloads in flight may commit first."""

import logging
import threading
from contextlib import asynccontextmanager

from fastapi.concurrency import run_in_threadpool

log = logging.getLogger("loader")

# On a stop, how long the downloads in flight may take to commit (a load ends with its last byte; the hash
# and the commit of its big part follow). Docker waits 10 s before it kills.
SETTLE_SECONDS = 5.0


def lifespan(services, built):
    """The app's lifespan: ``services()`` gives the process's Services (the first call builds them),
    ``built()`` gives them once built, else None."""

    @asynccontextmanager
    async def span(_app):
        # The compiled modules load in the background: /health answers at once, and the first request that
        # needs them waits only for what is left.
        builder = threading.Thread(target=services, daemon=True, name="services")
        builder.start()
        yield
        builder.join(SETTLE_SECONDS)
        if built() is None:
            return  # the compiled modules were never loaded: nothing can be in flight
        if not await run_in_threadpool(services().cache.settle, SETTLE_SECONDS):
            log.warning("stopping with a download not yet committed: it is fetched again next time")

    return span
