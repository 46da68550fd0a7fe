"""Azaion.Loader: the HTTP face of the compiled modules (contract section 4).

This file only translates HTTP to module calls and errors to statuses. The compiled modules are
imported lazily, on the first request that needs them, so the process answers /health at once.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

# The exception hierarchy, the heap and the boundary are the compiled modules imported eagerly: they are
# tiny, the error handlers and the guard are in place before the first request, and the heap is set up
# before any thread starts.
import boundary
import errors
import heap

log = logging.getLogger("loader")


class Settings(BaseSettings):
    """Configuration from the environment; names and defaults of contract section 6."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    resource_api_url: str = "https://api.azaion.com"
    loader_host: str = "127.0.0.1"
    loader_port: int = 8080
    model_cache_dir: str = "/var/lib/azaion/models"
    images_path: str = "/opt/azaion/images.enc"
    unlock_images: str = ""
    docker_host: str | None = None
    log_level: str = "INFO"
    api_timeout: float = 30.0  # one attempt's connect and read timeout (each read of the answer)
    api_deadline: float = 60.0  # a whole Resource API call, retries included: past it, 504
    cdn_speed_limit: int = 16 * 1024  # a CDN transfer slower than this many bytes a second ...
    cdn_speed_time: float = 30.0  # ... for this many seconds is dropped and resumed, at last 504
    client_stall_timeout: float = 60.0  # a /load client that reads nothing this long is cut off
    load_memory_bytes: int = 128 * 1024**2  # the one budget of the buffers of loads, downloads and hand-over
    cdn_max_bytes_per_s: int = Field(0, ge=0)  # all CDN downloads together; 0: no cap
    model_cache_max_bytes: int = Field(0, ge=0)  # the cache's committed parts at most; 0: the disk decides
    model_cache_min_free_bytes: int = Field(1024**3, ge=0)  # a download never leaves less free on the disk
    max_upload_bytes: int = 20 * 1024**3
    max_json_bytes: int = 64 * 1024
    require_manifest: bool = False
    trusted_publishers: str = ""  # a file of the PEM Ed25519 public keys whose signatures a load accepts
    require_signature: bool = False  # refuse manifests no trusted publisher signed (and format 1)
    publisher_key_file: str = ""  # a PEM PKCS#8 Ed25519 private key: uploads sign their manifests with it
    allowed_hosts: str = ""
    loader_socket: str = ""

    @model_validator(mode="after")
    def _key_files(self) -> "Settings":
        """The key files are read at start: a bad one stops the loader with its reason, not the first load."""
        import signing

        if self.require_signature and not self.trusted_publishers:
            raise ValueError("REQUIRE_SIGNATURE=true needs TRUSTED_PUBLISHERS (the publishers' public keys)")
        signing.Trust.from_file(self.trusted_publishers)
        if self.publisher_key_file:
            signing.Publisher.from_file(self.publisher_key_file)
        return self


class Credentials(BaseModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class LoadRequest(BaseModel):
    folder: str = Field(max_length=128)


class ErrorDetail(BaseModel):
    """The body of every error (contract section 4)."""

    detail: str


def errors_for(*codes: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route answers, all ``{"detail": text}``; declaring 422
    also replaces FastAPI's default 422 body (a list), which the handler below never sends."""
    return {code: {"model": ErrorDetail} for code in codes}


@cache
def settings() -> Settings:
    return Settings()


class Services:
    """The compiled modules, wired together: built once per process, by ``services()``, from the parts
    ``Services.from_settings`` makes (or a test's fakes, through ``use_services``)."""

    def __init__(self, *, api, cache, store, unlock_status, unlocker, workers=None):
        import read_ahead
        import upload_form

        self.api = api  # the /login session, which loads and uploads follow
        self.cache = cache
        self.store = store
        self.unlock_status = unlock_status
        self.unlocker = unlocker
        # The threads of the blocking work, a pool for each kind (see workers.pyx), and the operations.
        self.workers = workers or worker_pools()
        self._receive_upload = upload_form.receive_upload
        self._read_ahead = read_ahead.ReadAhead
        self.bytes_loaded = 0
        self.bytes_uploaded = 0

    @classmethod
    def from_settings(cls, s: Settings) -> "Services":
        import api_client
        import binary_split
        import cdn_manager
        import constants
        import download
        import hardware_service
        import model_cache
        import signing
        import unlock_state

        cdn_manager.warm_up()  # the CDN clients a login makes are then quick
        hardware = hardware_service.HardwareService()
        heap.buffers.resize(s.load_memory_bytes)
        throttle = cdn_manager.Throttle(s.cdn_max_bytes_per_s)  # one cap for all CDN downloads together

        def resource_api():
            """A session of its own with the Resource API."""
            return api_client.ResourceApi(
                s.resource_api_url,
                lambda: hardware.hardware,
                timeout=(min(5.0, s.api_timeout), s.api_timeout),
                deadline=s.api_deadline,
            )

        def cdn(text):
            config = cdn_manager.CdnConfig.from_yaml(text)
            return cdn_manager.CdnManager(
                config, speed_limit=s.cdn_speed_limit, speed_time=s.cdn_speed_time, throttle=throttle
            )

        # How long a worker may be held before the loader counts it stuck: a load makes two Resource API
        # calls in turn at most (the session's cdn.yaml, then its parts), may wait for a CDN download's
        # resumes (a crawling transfer is dropped at most two windows of CDN_SPEED_TIME after it began to
        # crawl, each try) and for room in the memory budget (freed by loads that end or are cut off).
        cdn_stall = (constants.CDN_RESUMES + 1) * 2 * s.cdn_speed_time + 2
        load_deadline = 2 * s.api_deadline + cdn_stall + s.client_stall_timeout + 30
        api = resource_api()
        cache = model_cache.BigPartCache(s.model_cache_dir, config=download.TransferConfig.from_settings(s))
        engine = 2 * constants.ENGINE_TIMEOUT
        unlock_status = unlock_state.UnlockStatus(
            deadlines={
                unlock_state.AUTHENTICATING: 2 * s.api_deadline + engine + 5,
                unlock_state.DOWNLOADING_KEY: s.api_deadline + 5,
                unlock_state.DECRYPTING: constants.ENGINE_LOAD_TIMEOUT,
                unlock_state.LOADING_IMAGES: constants.ENGINE_LOAD_TIMEOUT,
            }
        )
        return cls(
            api=api,
            cache=cache,
            store=binary_split.ModelStore(
                api,
                cache,
                cdn,
                max_upload=s.max_upload_bytes,
                require_manifest=s.require_manifest,
                trust=signing.Trust.from_file(s.trusted_publishers, s.require_signature),
                publisher=signing.Publisher.from_file(s.publisher_key_file) if s.publisher_key_file else None,
            ),
            unlock_status=unlock_status,
            # Unlock signs in with a session of its own: an unlock with other credentials never turns the
            # /login session (whose loads and uploads follow) into another user's.
            unlocker=binary_split.Unlocker(
                resource_api(), unlock_status, s.images_path, s.unlock_images.split(), s.docker_host
            ),
            workers=worker_pools(load_deadline, s.api_deadline + 5),
        )

    @staticmethod
    def credentials(email: str, password: str):
        from credentials import Credentials as Creds

        return Creds(email, password)

    def authenticate(self, email: str, password: str):
        creds = self.credentials(email, password)
        user = self.api.login(creds)
        threading.Thread(target=self._after_login, daemon=True, name="cdn-prepare").start()
        return user

    def _after_login(self):
        self.store.prepare()  # cdn.yaml and the CDN clients, ready before the first load asks for them
        self.store.resume_prefetches()  # then the prefetches a restart interrupted go on

    async def upload(self, name: str, headers, body, limit: int) -> int:
        """Stage, encrypt and publish the multipart ``body`` as it arrives; returns the plaintext size."""
        size = await self._receive_upload(self.store, name, headers, body, limit)
        self.bytes_uploaded += size
        return size

    def start_unlock(self, email: str, password: str):
        return self.unlocker.start(self.credentials(email, password))

    async def load(self, folder: str, name: str):
        """The decrypted resource, prepared on a thread of the load pool (at most a few per resource)."""
        return await self.workers.load.run(
            self.store.load, folder, name, what=f"{folder}/{name}"[:300], key=(folder, name)
        )

    async def prefetch(self, folder: str, name: str):
        """Start or join the download of a big part into the cache: (200 or 202, its download status)."""
        return await self.workers.load.run(
            self.store.prefetch, folder, name, what=f"{folder}/{name}"[:300], key=(folder, name)
        )

    def downloads(self):
        return {"downloads": self.cache.transfers(), "cache": self.cache.usage()}

    async def login(self, email: str, password: str):
        return await self.workers.login.run(self.authenticate, email, password, what="login")

    async def stream_loaded(self, plaintext, what: str):
        """Send a load's chunks as a worker thread reads and decrypts them, at most LOAD_AHEAD ahead, so
        reading and decrypting the next chunks overlaps with sending this one. A failure after the answer
        began can only cut it off."""
        chunks = self._read_ahead(plaintext, LOAD_AHEAD, "load-stream")
        op = self.workers.begin("stream", what[:300])
        try:
            async for chunk in chunks:
                self.bytes_loaded += len(chunk)
                yield chunk
        except errors.LoaderError as exc:
            raise CutOff(exc.detail) from exc
        finally:
            self.workers.end(op)
            chunks.stop()  # the client is gone, or all was sent: the worker closes the load's files


class CutOff(Exception):  # noqa: N818 - what happens to the answer, not an error kind of the loader
    """A load failed after its answer began. The status line is gone; the only way left to tell the client
    is to drop the connection short of the announced Content-Length (see ``Edge``)."""


class ClientStalled(CutOff):
    """The client read nothing of a load's answer for the client stall time: it is let go."""


class LoadResponse(StreamingResponse):
    """A load's answer: however its sending ends (sent, cut off, the client gone or stalled), the stream is
    closed at once, so its worker stops and its buffers go back to the budget, not whenever the collector
    finds it."""

    async def stream_response(self, send):
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


_services: Services | None = None
_build: Callable[[Settings], Services] = Services.from_settings
_services_lock = threading.Lock()


def services() -> Services:
    """The one Services of the process: the first caller builds it, every other waits for that one (two
    first requests at once must not build two, each with its own session and cache)."""
    global _services
    if _services is None:
        with _services_lock:
            if _services is None:
                _services = _build(settings())
    return _services


def use_services(factory: Callable[[Settings], Services] = Services.from_settings) -> None:
    """Build the process's Services with ``factory(settings)`` from now on, and drop the one built before:
    tests start each app afresh, or with parts of their own."""
    global _services, _build
    with _services_lock:
        _services, _build = None, factory


async def built_services() -> Services:
    """The route dependency: the Services without a worker thread once they are built (every route then
    answers while the worker pools are busy), built on a thread the first time."""
    return _services if _services is not None else await run_in_threadpool(services)


Svc = Annotated[Services, Depends(built_services)]

# Decrypted chunks of a load waiting to be sent, at most.
LOAD_AHEAD = 2
# Threads that prepare loads (up to their first byte), at most per resource, and threads for logins.
LOAD_WORKERS = 64
LOAD_WORKERS_PER_RESOURCE = 4
LOGIN_WORKERS = 4


def worker_pools(load_deadline: float = 300.0, login_deadline: float = 60.0):
    """The pools of the blocking work (workers.pyx), each with the seconds a call may hold a thread before
    /health counts it stuck."""
    import workers

    return workers.Pools(
        workers.Pool("load", LOAD_WORKERS, load_deadline, per_key=LOAD_WORKERS_PER_RESOURCE),
        workers.Pool("login", LOGIN_WORKERS, login_deadline),
    )


# On a stop, how long the downloads in flight may take to commit (a load ends with its last byte; the hash
# and the commit of its big part follow). Docker waits 10 s before it kills.
SETTLE_SECONDS = 5.0


@asynccontextmanager
async def lifespan(_app: FastAPI):
    # The compiled modules load in the background: /health answers at once, and the first request that
    # needs them waits only for what is left.
    builder = threading.Thread(target=services, daemon=True, name="services")
    builder.start()
    yield
    builder.join(SETTLE_SECONDS)
    if _services is None:
        return  # the compiled modules were never loaded: nothing can be in flight
    if not await run_in_threadpool(services().cache.settle, SETTLE_SECONDS):
        log.warning("stopping with a download not yet committed: it is fetched again next time")


# 413 on every route: the middleware refuses any body over the limits before routing.
routes = APIRouter(responses=errors_for(403, 413, 421))  # 403 and 421: boundary.HostGuard, on every route


# --- errors: the one place where exceptions become statuses ----------------------------------------

STATUS = (  # most specific first; LoaderError, the root, last
    (errors.UpstreamTimeout, 504),
    (errors.NotLoggedIn, 401),
    (errors.DecryptionError, 502),
    (errors.BadRequest, 400),
    (errors.PayloadTooLarge, 413),
    (errors.AuthError, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.HardwareMismatch, 409),
    (errors.UpstreamError, 502),
    (errors.IntegrityError, 502),
    (errors.StorageError, 507),
    (errors.EngineError, 502),
    (errors.LoaderError, 500),
)


def status_of(exc: errors.LoaderError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


async def loader_error(request: Request, exc: errors.LoaderError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=status_of(exc))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, _printable(request.url.path))
    return JSONResponse({"detail": "internal error"}, status_code=500)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the input back; the input may be a password, so only name the fields.
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
    return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)


async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # The client left while its body was read (an upload it gave up on): nobody reads the answer, and it is
    # no fault of the loader's, so one line says so, not an ERROR with a traceback.
    log.info(
        "%s %s: the client went away before its request was read",
        request.method,
        _printable(request.url.path),
    )
    return JSONResponse({"detail": "the client went away before its request was read"}, status_code=400)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)


HANDLERS = (
    (errors.LoaderError, loader_error),
    (Exception, unexpected_error),
    (RequestValidationError, invalid_request),
    (ClientDisconnect, client_gone),
    (StarletteHTTPException, http_error),
)


# --- middleware: one log line per request, metrics, body limits ---------------------------------------


# Set in the server's task of a request whose answer the loader cut off (see ``Edge``).
_cut_off: ContextVar[bool] = ContextVar("cut_off", default=False)
UNFINISHED = "ASGI callable returned without completing response."  # uvicorn's words, at ERROR


def _not_a_cut_off(record: logging.LogRecord) -> bool:
    """uvicorn's filter: its ERROR for an answer left unfinished is dropped when the loader cut it off on
    purpose (its own warning said why); for any other request it stays."""
    return not (_cut_off.get() and record.msg == UNFINISHED)


class Edge:
    """Pure ASGI middleware (BaseHTTPMiddleware would re-buffer every streamed chunk): refuses bodies over
    the JSON limit without reading them, writes one log line per request, records request metrics, and
    tells ``memory`` (heap.MemoryTrim) when requests begin and end, so the heap is trimmed once idle."""

    def __init__(self, app, memory):
        self.app = app
        self.memory = memory
        # One filter however many apps are built: logging adds the same filter only once.
        logging.getLogger("uvicorn.error").addFilter(_not_a_cut_off)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        limit = None if scope["path"].startswith("/upload/") else settings().max_json_bytes
        # A client that reads nothing of a load's answer for this long is let go (contract section 11).
        stall = settings().client_stall_timeout if scope["path"].startswith("/load/") else 0
        self.memory.begin()

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif stall > 0:  # the server's send waits while the client's socket is full
                try:
                    async with asyncio.timeout(stall):
                        return await send(message)
                except TimeoutError:
                    raise ClientStalled(f"the client read nothing for {stall:g} s") from None
            await send(message)

        try:
            body = receive if limit is None else await _bounded_body(scope, receive, limit)
            if body is None:
                too_large = JSONResponse(
                    {"detail": f"request body larger than {limit} bytes"}, status_code=413
                )
                return await too_large(scope, receive, counted_send)
            await self.app(scope, body, counted_send)
        except CutOff as exc:
            # Returning without the end of the body makes the server drop the connection: the client
            # sees a broken transfer. ASGI has no quieter way to abort an answer (raising, or ending it
            # short, is an ERROR too), so uvicorn's ERROR for it is filtered: one warning says why.
            _cut_off.set(True)  # in the server's task, which logs once this returns
            if isinstance(exc, ClientStalled):
                _abort(receive)
            log.warning(
                "%s %s cut off after its answer began: %s", scope["method"], _printable(scope["path"]), exc
            )
        finally:
            self.memory.end(heavy=scope["path"].startswith(("/load/", "/upload/")))
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics().observe(scope["method"], route, status, elapsed)
            log.info("%s %s %d %.1fms", scope["method"], _printable(scope["path"]), status, elapsed * 1000)


def _abort(receive) -> None:
    """Drop the connection at once, with what is still queued for the client: closing it would wait for a
    client that reads nothing. uvicorn's ``receive`` is a method of the request's cycle, which holds the
    connection's transport; another server's is left to close the connection itself."""
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()


def _printable(path: str) -> str:
    """A request path for the log: percent-decoded, it may hold a newline that would forge a log line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in path)


async def _bounded_body(scope, receive, limit: int):
    """Read a small body whole (at most ``limit`` bytes, announced or chunked) and replay it; None when it
    is larger, so that it is refused before more than ``limit`` bytes are held."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            parts = None
            replay = message
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    else:
        replay = {"type": "http.request", "body": b"".join(parts), "more_body": False}
    sent = False

    async def replay_receive():
        nonlocal sent
        if not sent:
            sent = True
            return replay
        return await receive()

    return replay_receive


# --- routes ------------------------------------------------------------------------------------------


@routes.get("/health", responses={503: {"description": '{"status": "unhealthy", "reason": "..."}'}})
async def health():
    # Before the Services are built nothing can be stuck: the process answers at once (see lifespan).
    reason = None if _services is None else _services.workers.unhealthy()
    if reason is not None:
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return {"status": "healthy"}


@routes.get("/status")
async def status(svc: Svc):
    return {
        "status": "running",
        "authenticated": svc.api.authenticated,
        "modelCacheDir": settings().model_cache_dir,
        "unlock": svc.unlock_status.snapshot(),
        "operations": svc.workers.operations(),
    }


@routes.post("/login", responses=errors_for(401, 422, 502, 504))
async def login(body: Credentials, svc: Svc):
    user = await svc.login(body.email, body.password)
    return {"status": "ok", "user": user.to_dict()}


@routes.post(
    "/load/{filename:path}",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The decrypted resource; Content-Length is its exact size. A failure after the "
            "first byte cuts the body off short of that length.",
        },
        **errors_for(400, 401, 404, 409, 422, 502, 504, 507),
    },
)
async def load(filename: str, body: LoadRequest, svc: Svc):
    plaintext = await svc.load(body.folder, filename)
    return LoadResponse(
        svc.stream_loaded(plaintext, f"{body.folder}/{filename}"),
        media_type="application/octet-stream",
        headers={"Content-Length": str(plaintext.size)},
    )


@routes.post(
    "/prefetch/{filename:path}",
    status_code=202,
    responses={
        200: {"description": "The big part is already cached and current: its status, state cached."},
        202: {"description": "The status of the download started, or joined (contract section 8)."},
        **errors_for(400, 401, 404, 422, 502, 504, 507),
    },
)
async def prefetch(filename: str, body: LoadRequest, svc: Svc):
    code, download = await svc.prefetch(body.folder, filename)
    return JSONResponse(download, status_code=code)


@routes.get("/downloads", responses=errors_for(507))
async def downloads(svc: Svc):  # off the event loop: the cache's usage reads the disk
    return await run_in_threadpool(svc.downloads)


@routes.post("/upload/{filename:path}", responses=errors_for(400, 401, 403, 422, 502, 504, 507))
async def upload(filename: str, request: Request, svc: Svc):
    size = await svc.upload(filename, request.headers, request.stream(), settings().max_upload_bytes)
    return {"status": "ok", "size": size}


@routes.post("/unlock", status_code=202, responses=errors_for(422))
async def unlock(body: Credentials, svc: Svc):
    return svc.start_unlock(body.email, body.password)  # starts a thread, or answers the one running


@routes.get("/unlock/status")
async def unlock_status(svc: Svc):
    return svc.unlock_status.snapshot()


@routes.get("/metrics", response_class=PlainTextResponse)
async def metrics_text(_svc: Svc):  # built (off the event loop) before the scrape reads its counters
    body, content_type = await run_in_threadpool(metrics().render)  # the cache's usage reads the disk
    return Response(body, media_type=content_type)


# --- the app -----------------------------------------------------------------------------------------


def create_app(memory: heap.MemoryTrim = heap.memory) -> FastAPI:
    """The loader's app: its routes, error handlers and edge; ``memory`` is the heap its requests trim (the
    process's, or a test's)."""
    app = FastAPI(title="Azaion.Loader", version="1.0.0", lifespan=lifespan)
    app.include_router(routes)
    for cls, handler in HANDLERS:
        app.add_exception_handler(cls, handler)
    app.add_middleware(Edge, memory=memory)
    # The outermost: a request from elsewhere than this device's apps gets no further (contract section 10).
    app.add_middleware(
        boundary.HostGuard, allowed_hosts=lambda: (settings().loader_host, settings().allowed_hosts)
    )
    return app


app = create_app()


# --- metrics ---------------------------------------------------------------------------------------------


@cache
def metrics():
    """The process's metrics, made on the first request; a scrape reads the services' counters."""
    from metrics import Metrics

    return Metrics(services)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # LOG_LEVEL=DEBUG is for the loader's own loggers. The libraries' DEBUG output prints whole requests
    # (botocore: the Authorization header with the CDN access key, and every signing step), so theirs
    # stays at INFO at most.
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "docker"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    # api_client tells each retry of the Resource API in the loader's own words; urllib3's own warning of a
    # retry after a broken connection would tell it twice.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def main() -> None:
    import uvicorn

    heap.tune_malloc()  # first, while this is the only thread
    try:
        s = settings()
    except ValueError as exc:  # pydantic's ValidationError names each setting and why
        raise SystemExit(f"invalid configuration: {exc}") from None
    configure_logging(s.log_level)
    options = {"log_level": s.log_level.lower(), "access_log": False, "timeout_graceful_shutdown": 5}
    if s.loader_socket:
        boundary.serve_unix(app, s.loader_socket, **options)
    else:
        uvicorn.run(app, host=s.loader_host, port=s.loader_port, **options)


if __name__ == "__main__":
    main()
