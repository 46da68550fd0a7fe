"""The reference Resource API: contract section 3, and nothing the contract leaves out.

    python -m devstack.api.server --data-dir D --host 127.0.0.1 --port P

The admin secret for ``/_devstack/`` comes from ``--admin-secret``, else ``$DEVSTACK_ADMIN_SECRET``, else
``config.json``. Passwords and tokens are never logged: uvicorn's access log has no bodies or headers.

``/_devstack/compromise`` (devstack.api.admin_routes) plays an attacker who controls this API: the files it
installs are served by ``POST /resources/get`` in place of the real ones, encrypted for the caller alike.
"""

import argparse
import math
import os
import time
import uuid
from pathlib import Path
from typing import Annotated

import jwt
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from devstack import crypto
from devstack.api.admin_routes import admin_router
from devstack.api.faults import FaultMiddleware, Faults
from devstack.api.store import InvalidName, Store, valid_name

UPLOAD_ROLES = {"Admin", "ResourceUploader", "ApiAdmin"}
CLAIM_NAMES = {
    "long": {
        "id": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
        "email": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
        "role": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
    },
    "short": {"id": "nameid", "email": "unique_name", "role": "role"},
}
# Login with an unknown email still pays for one hash, so timing does not tell which emails exist.
_DUMMY_USER = {"salt": "00" * 16, "password_hash": "00" * 32}


class Credentials(BaseModel):
    email: str
    password: str


class ResourceRequest(BaseModel):
    fileName: str  # camelCase: the wire name
    password: str
    hardware: str


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


def issue_token(store: Store, user: dict) -> str:
    config = store.config
    names = CLAIM_NAMES[config["claims_style"]]
    now = time.time()
    claims = {
        names["id"]: user["id"],
        names["email"]: user["email"],
        "iat": int(now),
        "exp": math.ceil(now + config["token_ttl_seconds"]),
        "jti": uuid.uuid4().hex,
    }
    roles = user["roles"]
    if roles:
        claims[names["role"]] = roles[0] if len(roles) == 1 else roles
    return jwt.encode(claims, config["jwt_secret"], algorithm="HS256")


def create_app(data_dir: Path | str, admin_secret: str | None = None) -> FastAPI:
    store = Store(data_dir)
    faults = Faults()
    app = FastAPI(title="Azaion Resource API (devstack reference)")
    app.state.store = store
    app.state.faults = faults
    app.state.admin_secret = (
        admin_secret or os.environ.get("DEVSTACK_ADMIN_SECRET") or store.config["admin_secret"]
    )
    app.add_middleware(FaultMiddleware, faults=faults)
    app.include_router(admin_router)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input, which may be a password.
        errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def current_user(authorization: Annotated[str | None, Header()] = None) -> dict:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("missing bearer token")
        config = store.config
        try:
            claims = jwt.decode(
                token, config["jwt_secret"], algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized("invalid or expired token") from exc
        user_id = claims.get(CLAIM_NAMES["long"]["id"]) or claims.get(CLAIM_NAMES["short"]["id"])
        user = store.find_user(user_id=user_id) if user_id else None
        if user is None:
            raise _unauthorized("unknown user")
        return user

    User = Annotated[dict, Depends(current_user)]

    @app.post("/login")
    def login(body: Credentials) -> dict:
        user = store.find_user(email=body.email)
        if not store.password_matches(user or _DUMMY_USER, body.password) or user is None:
            raise HTTPException(401, "bad credentials")
        return {"token": issue_token(store, user)}

    def get_resource(folder: str | None, body: ResourceRequest, user: dict) -> Response:
        try:
            path = store.served_path(folder, body.fileName)  # a substitute while compromised
        except InvalidName as exc:
            raise HTTPException(400, str(exc)) from exc
        if not store.password_matches(user, body.password):
            raise HTTPException(403, "wrong password")
        if not store.bind_hardware(user["id"], body.hardware):
            raise HTTPException(409, "the account is bound to other hardware")
        try:
            if path is None:  # withheld
                raise FileNotFoundError(body.fileName)
            source = open(path, "rb")  # closed by the streaming generator below
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise HTTPException(404, "no such file") from exc
        size = os.fstat(source.fileno()).st_size
        key = crypto.api_key(user["email"], body.password, body.hardware)

        def blob():
            with source:
                yield from crypto.encrypt_stream(key, iter(lambda: source.read(1024 * 1024), b""))

        return StreamingResponse(
            blob(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(crypto.encrypted_size(size))},
        )

    # Declared before POST /resources/{folder}, which would otherwise take "get" for a folder name.
    @app.post("/resources/get")
    def get_root_resource(body: ResourceRequest, user: User) -> Response:
        return get_resource(None, body, user)

    @app.post("/resources/get/{folder}")
    def get_folder_resource(folder: str, body: ResourceRequest, user: User) -> Response:
        return get_resource(folder, body, user)

    @app.post("/resources/{folder}", status_code=201)
    async def upload(folder: str, request: Request, user: User) -> dict:
        # The role is checked before the form is parsed: a refused upload is not received first.
        if not UPLOAD_ROLES & set(user["roles"]):
            raise HTTPException(403, "this role may not upload")
        if not valid_name(folder):
            raise HTTPException(400, "bad folder name")
        async with request.form(max_files=1) as form:
            data = form.get("data")
            if not isinstance(data, UploadFile) or not data.filename:
                raise HTTPException(422, "multipart field 'data' with a filename is required")
            if not valid_name(data.filename):
                raise HTTPException(400, "bad file name")
            # Starlette has spooled the part to a temporary file; copy it over in chunks.
            size = await run_in_threadpool(store.write_resource, folder, data.filename, data.file)
        return {"folder": folder, "fileName": data.filename, "size": size}

    @app.get("/binary-split/key-fragment")
    def key_fragment(user: User) -> Response:
        fragment = store.key_fragment()
        if fragment is None:
            raise HTTPException(404, "no key fragment registered")
        return Response(fragment, media_type="application/octet-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.api.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--admin-secret", default=None, help="default: $DEVSTACK_ADMIN_SECRET or config.json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    app = create_app(args.data_dir, args.admin_secret)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
