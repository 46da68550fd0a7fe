# cython: language_level=3, embedsignature=True
"""The unlock: the encrypted ``docker save`` archive, decrypted straight into the Docker Engine (contract
section 5, "Unlock").

When every image of ``unlock_images`` is in the Engine already, there is nothing to do. Else the archive's
key is SHA-256 of the key fragment the Resource API hands the user the unlock signs in as. Before a byte
goes to the Engine the archive's last block is decrypted alone (its padding shows a wrong key or a damaged
archive); then a second thread reads and decrypts ahead while this one hands the chunks to the Engine.
Progress and failures are reported through ``unlock_state`` (one unlock at a time).
"""

import logging
import os
import threading

import security
from aligned_io import read_tail
from constants import (CHUNK_SIZE, DECRYPTING, DOWNLOADING_KEY, ENGINE_LOAD_TIMEOUT, ENGINE_TIMEOUT,
                       LOADING_IMAGES)
from errors import DecryptionError, EngineError, IntegrityError, LoaderError, NotFound, StorageError
from read_ahead import ReadAhead

log = logging.getLogger("loader.unlock")

# Decrypted chunks of the image archive waiting to be sent to the Docker Engine, at most.
PIPELINE_DEPTH = 4


class Unlocker:
    """Runs at most one unlock at a time in a background thread; progress lives in ``status``."""

    def __init__(self, api, status, images_path, unlock_images=(), docker_host=None,
                 engine_timeout=ENGINE_TIMEOUT, load_timeout=ENGINE_LOAD_TIMEOUT, chunk_size=CHUNK_SIZE):
        self._api = api
        self.status = status
        self._path = images_path
        self._wanted = tuple(unlock_images)
        self._docker_host = docker_host
        self._engine_timeout = engine_timeout  # a question to the Engine
        self._load_timeout = load_timeout  # loading the archive
        self._chunk = chunk_size

    def start(self, credentials):
        """Begin an unlock unless one runs; returns the status either way."""
        run = self.status.try_begin()
        if run is not None:
            threading.Thread(target=self._run, args=(credentials, run), daemon=True, name="unlock").start()
        return self.status.snapshot()

    def _docker(self):
        """A client of the Engine. Building one asks the Engine for its API version, so an Engine that
        does not answer (dockerd stopped, the socket gone) fails here too: told apart from settings the SDK
        refuses, and named by its address, never by the SDK's text (which may quote a password in it)."""
        import docker  # heavy: imported only when an unlock runs
        try:
            if self._docker_host:
                return docker.APIClient(base_url=self._docker_host, timeout=self._engine_timeout)
            return docker.APIClient(timeout=self._engine_timeout, **docker.utils.kwargs_from_env())
        except (docker.errors.DockerException, ValueError) as exc:  # ValueError: an address urllib refuses
            if isinstance(exc.__cause__, _engine_errors()):
                log.debug("connecting to the Docker Engine failed", exc_info=True)
                raise self._unreachable(exc.__cause__) from exc
            invalid = f"the Docker Engine's address or TLS settings are invalid ({type(exc).__name__})"
            raise EngineError(invalid) from exc

    def _unreachable(self, exc):
        return EngineError(f"the Docker Engine at {_engine_address(self._docker_host)} is unreachable "
                           f"({type(exc).__name__})")

    def _run(self, credentials, run):
        """One unlock on its own thread, reporting through ``run`` (see unlock_state.Run)."""
        try:
            images = self._unlock(credentials, run)
        except LoaderError as exc:
            log.warning("unlock failed: %s", exc.detail)
            run.fail(exc.detail)
        except Exception as exc:  # noqa: BLE001 - the state must never stay stuck in a running state
            log.exception("unlock failed unexpectedly")
            run.fail(f"unlock failed unexpectedly ({type(exc).__name__})")
        else:
            log.info("unlock ready: %s", " ".join(images))
            run.succeed(images)

    def _unlock(self, credentials, run):
        client = self._docker()
        try:
            return self._unlock_with(client, credentials, run)
        finally:
            client.close()

    def _unlock_with(self, client, credentials, run):
        try:
            if self._wanted and self._all_present(client):
                return list(self._wanted)
        except _engine_errors() as exc:
            log.debug("asking the Docker Engine for the images failed", exc_info=True)
            raise self._unreachable(exc) from exc
        total = self._archive(os.path.getsize)
        self._api.login(credentials)
        run.set_state(DOWNLOADING_KEY)
        key = security.archive_key(self._api.key_fragment())
        if not self._archive(_archive_decrypts, key):
            raise DecryptionError("the image archive does not decrypt: wrong key or corrupt archive")
        run.set_total(total)
        run.set_state(DECRYPTING)
        client.timeout = self._load_timeout  # the SDK's timeout for each call from here on
        try:
            events = client.load_image(self._plaintext(key, run))
            run.set_state(LOADING_IMAGES)
            return self._loaded_tags(events)
        except DecryptionError as exc:
            raise DecryptionError("the image archive does not decrypt: wrong key or corrupt archive") from exc
        except _engine_errors() as exc:
            # The archive's own read errors come as a StorageError: an OSError here is the Engine's socket.
            log.debug("loading the images into the Docker Engine failed", exc_info=True)
            raise EngineError(
                f"the Docker Engine failed while loading images ({type(exc).__name__})"
            ) from exc

    def _archive(self, read, *args):
        """``read(path, *args)`` of the image archive, its OSError the loader's error."""
        try:
            return read(self._path, *args)
        except FileNotFoundError as exc:
            raise NotFound(f"the image archive is missing at {self._path}") from exc
        except OSError as exc:
            log.debug("reading the image archive failed", exc_info=True)
            raise StorageError(f"the image archive at {self._path} cannot be read ({exc.strerror})") from exc

    def _all_present(self, client):
        from docker.errors import ImageNotFound

        for ref in self._wanted:
            try:
                client.inspect_image(ref)
            except ImageNotFound:
                return False
        return True

    def _plaintext(self, key, run):
        """Decrypted chunks of the archive. A second thread reads and decrypts ahead (at most
        PIPELINE_DEPTH chunks) while this one hands chunks to the Engine, so the two overlap."""
        with ReadAhead(self._decrypted(key, run), PIPELINE_DEPTH, "unlock-decrypt") as chunks:
            yield from chunks

    def _decrypted(self, key, run):
        try:
            dec = security.Decryptor(key)
            with open(self._path, "rb") as f:
                while True:
                    # A fresh buffer each time: the consumer may still be sending the previous one.
                    data = f.read(self._chunk)
                    if not data:
                        break
                    out = dec.update(data)
                    run.add_done(len(data))
                    if len(out):
                        yield out
            last = dec.finalize()
        except OSError as exc:
            # Not an OSError on the Engine's side: requests would take it for its socket's.
            log.debug("reading the image archive failed", exc_info=True)
            raise StorageError(f"the image archive at {self._path} cannot be read ({exc.strerror})") from exc
        if last:
            yield last

    @staticmethod
    def _loaded_tags(events):
        tags = []
        for event in events:
            if not isinstance(event, dict):
                continue
            if event.get("errorDetail") or event.get("error"):
                detail = event.get("errorDetail") or {}
                message = detail.get("message") if isinstance(detail, dict) else None
                raise EngineError(f"the Docker Engine refused the images: {message or event.get('error')}")
            text = event.get("stream") or ""
            for line in text.splitlines():
                if line.startswith("Loaded image: "):
                    tags.append(line[len("Loaded image: "):].strip())
                elif line.startswith("Loaded image ID: "):
                    tags.append(line[len("Loaded image ID: "):].strip())
        if not tags:
            raise EngineError("the Docker Engine loaded no image from the archive")
        return tags


def _engine_errors():
    """What the Docker SDK raises when the Engine fails: its own errors, requests', and urllib3's or the
    socket's while it reads a streamed answer."""
    import http.client

    import requests
    import urllib3
    from docker.errors import DockerException

    return (DockerException, requests.RequestException, urllib3.exceptions.HTTPError,
            http.client.HTTPException, OSError)


def _engine_address(host):
    """The Engine's address for a message: ``host`` (DOCKER_HOST), or the SDK's default socket; without the
    user and password an ssh:// address may hold."""
    host = host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    scheme, sep, rest = host.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}" if sep else host.rpartition("@")[2]


def _archive_decrypts(path, key):
    """The archive is a whole number of blocks and its last block decrypts under ``key``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            security.plaintext_size(key, size, read_tail(f, size, security.TAIL))
            return True
        except IntegrityError:  # a DecryptionError, or the file shrank under us
            return False
