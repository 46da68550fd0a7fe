"""Azaion.Loader: the HTTP face of the compiled modules (contract section 4).

This file only translates HTTP to module calls and errors to statuses: the routes, the table of statuses,
the settings and the wiring of the modules. The compiled modules are imported lazily, on the first request
that needs them, so the process answers /health at once.
"""

import threading
from collections.abc import Callable
from functools import cache
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

# Imported eagerly: each is small (none imports a heavy module) and needed to make the app: the errors and
# their answers, the request bodies (schemas), the guard (boundary), the edge and its logs, the lifespan, the
# base of Services (operations), and the heap, set up before any thread starts.
import boundary
import edge
import error_answers
import errors
import heap
import lifecycle
import logs
import operations
from schemas import Credentials, LoadRequest, errors_for


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


settings = cache(Settings)  # the process's one Settings, read at the first call


class Services(operations.Operations):
    """The compiled modules, wired together (what the routes ask of them: operations.pyx): built once per
    process, by ``services()``, from the parts ``from_settings`` makes (or a test's, by ``use_services``)."""

    @classmethod
    def from_settings(cls, s: Settings) -> "Services":
        import api_client
        import binary_split
        import cdn_manager
        import deadlines
        import download
        import hardware_service
        import model_cache
        import signing
        import unlock
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

        def cdn(text):  # the CDN clients of a cdn.yaml, within the speed limits and the one throttle
            limits = {"speed_limit": s.cdn_speed_limit, "speed_time": s.cdn_speed_time, "throttle": throttle}
            return cdn_manager.CdnManager(cdn_manager.CdnConfig.from_yaml(text), **limits)

        api = resource_api()
        cache = model_cache.BigPartCache(s.model_cache_dir, config=download.TransferConfig.from_settings(s))
        unlock_status = unlock_state.UnlockStatus(deadlines=deadlines.unlock(s))
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
            unlocker=unlock.Unlocker(
                resource_api(), unlock_status, s.images_path, s.unlock_images.split(), s.docker_host
            ),
            workers=operations.worker_pools(deadlines.load(s), deadlines.login(s)),  # see deadlines.pyx
        )


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


@cache
def metrics():
    """The process's metrics, made on the first request; a scrape reads the services' counters."""
    from metrics import Metrics

    return Metrics(services)


Svc = Annotated[Services, Depends(built_services)]

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


# The answer to each exception that leaves a route, with its status (error_answers.pyx): {"detail": text}.
HANDLERS = (
    (errors.LoaderError, error_answers.loader_error(status_of)),
    (Exception, error_answers.unexpected_error(500)),
    (RequestValidationError, error_answers.invalid_request(422)),
    (ClientDisconnect, error_answers.client_gone(400)),
    (StarletteHTTPException, error_answers.http_error),  # its own status (404, 405, ...)
)


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
    import streaming  # imported with the Services

    plaintext = await svc.load(body.folder, filename)
    return streaming.LoadResponse(svc.stream_loaded(plaintext, f"{body.folder}/{filename}"), plaintext.size)


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


def create_app(memory: heap.MemoryTrim = heap.memory) -> FastAPI:
    """The loader's app: its routes, error handlers and edge; ``memory``: the heap its requests trim."""
    lifespan = lifecycle.lifespan(services, lambda: _services)  # the Services are built in the background
    app = FastAPI(title="Azaion.Loader", version="1.0.0", lifespan=lifespan)
    app.include_router(routes)
    for cls, handler in HANDLERS:
        app.add_exception_handler(cls, handler)
    app.add_middleware(edge.Edge, memory=memory, settings=settings, metrics=metrics)
    # The outermost: a request from elsewhere than this device's apps gets no further (contract section 10).
    app.add_middleware(
        boundary.HostGuard, allowed_hosts=lambda: (settings().loader_host, settings().allowed_hosts)
    )
    return app


app = create_app()


def main() -> None:
    import uvicorn

    heap.tune_malloc()  # first, while this is the only thread
    try:
        s = settings()
    except ValueError as exc:  # pydantic's ValidationError names each setting and why
        raise SystemExit(f"invalid configuration: {exc}") from None
    logs.configure_logging(s.log_level)
    options = {"log_level": s.log_level.lower(), "access_log": False, "timeout_graceful_shutdown": 5}
    if s.loader_socket:
        boundary.serve_unix(app, s.loader_socket, **options)
    else:
        uvicorn.run(app, host=s.loader_host, port=s.loader_port, **options)


if __name__ == "__main__":
    main()
