# cython: language_level=3, embedsignature=True
"""What the routes ask of the compiled modules, each on the threads of its kind: a login (and what it
starts in the background), a load up to its first byte, a prefetch, an upload, an unlock's start, the
downloads' status; with the counters of the bytes loaded and uploaded.

``Operations`` is the base of main.Services, which wires the parts together (``Services.from_settings``);
only the standard library is imported here, the modules an operation needs once the parts are built.
"""

import threading

# Threads that prepare loads (up to their first byte), at most per resource, and threads for logins.
LOAD_WORKERS = 64
LOAD_WORKERS_PER_RESOURCE = 4
LOGIN_WORKERS = 4


def worker_pools(load_deadline=300.0, login_deadline=60.0):
    """The pools of the blocking work (workers.pyx), each with the seconds a call may hold a thread before
    /health counts it stuck."""
    import workers

    return workers.Pools(
        workers.Pool("load", LOAD_WORKERS, load_deadline, per_key=LOAD_WORKERS_PER_RESOURCE),
        workers.Pool("login", LOGIN_WORKERS, login_deadline),
    )


class Operations:
    """The operations on the parts: ``api`` (the /login session, which loads and uploads follow), the
    ``cache`` of big parts, the ``store`` of models, the ``unlock_status`` and the ``unlocker``."""

    def __init__(self, *, api, cache, store, unlock_status, unlocker, workers=None):
        import streaming
        import upload_form

        self.api = api  # the /login session, which loads and uploads follow
        self.cache = cache
        self.store = store
        self.unlock_status = unlock_status
        self.unlocker = unlocker
        # The threads of the blocking work, a pool for each kind (see workers.pyx), and the operations.
        self.workers = workers or worker_pools()
        self._receive_upload = upload_form.receive_upload
        self._stream_loaded = streaming.stream_loaded
        self.bytes_loaded = 0
        self.bytes_uploaded = 0

    @staticmethod
    def credentials(email, password):
        from credentials import Credentials as Creds

        return Creds(email, password)

    def authenticate(self, email, password):
        creds = self.credentials(email, password)
        user = self.api.login(creds)
        threading.Thread(target=self._after_login, daemon=True, name="cdn-prepare").start()
        return user

    def _after_login(self):
        self.store.prepare()  # cdn.yaml and the CDN clients, ready before the first load asks for them
        self.store.resume_prefetches()  # then the prefetches a restart interrupted go on

    async def upload(self, name, headers, body, limit):
        """Stage, encrypt and publish the multipart ``body`` as it arrives; returns the plaintext size."""
        size = await self._receive_upload(self.store, name, headers, body, limit)
        self.bytes_uploaded += size
        return size

    def start_unlock(self, email, password):
        return self.unlocker.start(self.credentials(email, password))

    async def load(self, folder, name):
        """The decrypted resource, prepared on a thread of the load pool (at most a few per resource)."""
        return await self.workers.load.run(
            self.store.load, folder, name, what=f"{folder}/{name}"[:300], key=(folder, name)
        )

    async def prefetch(self, folder, name):
        """Start or join the download of a big part into the cache: (200 or 202, its download status)."""
        return await self.workers.load.run(
            self.store.prefetch, folder, name, what=f"{folder}/{name}"[:300], key=(folder, name)
        )

    def downloads(self):
        return {"downloads": self.cache.transfers(), "cache": self.cache.usage()}

    async def login(self, email, password):
        return await self.workers.login.run(self.authenticate, email, password, what="login")

    def stream_loaded(self, plaintext, what):
        """The chunks of a load's answer (streaming.stream_loaded), counted in ``bytes_loaded``."""
        return self._stream_loaded(self, plaintext, what)

    def stats(self):
        """Its own figures for /metrics (metrics.pyx): ``{"bytes_loaded": int, "bytes_uploaded": int}``."""
        return {"bytes_loaded": self.bytes_loaded, "bytes_uploaded": self.bytes_uploaded}
