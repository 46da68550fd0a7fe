"""``/_devstack/``: what a test or the seed step needs to arrange the reference API's state.

Every call but ``GET /_devstack/health`` needs the header ``X-Devstack-Admin: <admin secret>``.
"""

import hmac
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from pydantic import BaseModel, Field

from devstack.api.faults import Fault
from devstack.api.store import InvalidName, Store


def _require_admin(request: Request, x_devstack_admin: Annotated[str | None, Header()] = None) -> None:
    expected = request.app.state.admin_secret
    if x_devstack_admin is None or not hmac.compare_digest(x_devstack_admin.encode(), expected.encode()):
        raise HTTPException(403, "X-Devstack-Admin header missing or wrong")


def _store(request: Request) -> Store:
    return request.app.state.store


StoreDep = Annotated[Store, Depends(_store)]
admin_router = APIRouter(prefix="/_devstack", tags=["devstack"])
guarded = APIRouter(dependencies=[Depends(_require_admin)])


class NewUser(BaseModel):
    email: str
    password: str
    roles: list[str] = Field(default_factory=list)


class ConfigChange(BaseModel):
    token_ttl_seconds: float | None = Field(default=None, gt=0)
    claims_style: Literal["long", "short"] | None = None


class FaultSpec(BaseModel):
    route: str = Field(description='shell pattern over "METHOD /path", e.g. "POST /resources/get*"')
    count: int | None = Field(default=1, ge=1, description="null: until cleared")
    status: int | None = Field(default=None, ge=100, le=599)
    delay: float = Field(default=0.0, ge=0)
    garbage: str | None = Field(
        default=None,
        description="html, truncated_json, not_jwt, empty, random, deep_json, huge, jwt_exp_inf, jwt_exp_nan",
    )
    trickle: float | None = Field(
        default=None, gt=0, description="bytes a second of the body (see devstack.api.faults)"
    )


@admin_router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@guarded.get("/users")
def users(store: StoreDep) -> list[dict]:
    return store.users()


@guarded.post("/users")
def add_user(body: NewUser, store: StoreDep) -> dict:
    return store.add_user(body.email, body.password, body.roles)


@guarded.delete("/users/{email}/hardware", status_code=204)
def reset_hardware(email: str, store: StoreDep) -> None:
    if not store.reset_hardware(email):
        raise HTTPException(404, "no such user")


@guarded.get("/config")
def config(store: StoreDep) -> dict:
    return {k: v for k, v in store.config.items() if not k.endswith("secret")}


@guarded.patch("/config")
def change_config(body: ConfigChange, store: StoreDep) -> dict:
    store.update_config(**body.model_dump())
    return config(store)


@guarded.get("/key-fragment")
def get_key_fragment(store: StoreDep) -> Response:
    fragment = store.key_fragment()
    if fragment is None:
        raise HTTPException(404, "no key fragment registered")
    return Response(fragment, media_type="application/octet-stream")


@guarded.put("/key-fragment", status_code=204)
async def set_key_fragment(request: Request, store: StoreDep) -> None:
    store.set_key_fragment(await request.body())


@guarded.delete("/key-fragment", status_code=204)
def delete_key_fragment(store: StoreDep) -> None:
    store.set_key_fragment(None)


async def _put_file(request: Request, store: Store, folder: str | None, name: str) -> dict:
    try:
        store.resource_path(folder, name)
    except InvalidName as exc:
        raise HTTPException(400, str(exc)) from exc
    with store.resource_writer(folder, name) as out:
        async for chunk in request.stream():
            out.write(chunk)
        size = out.tell()
    return {"folder": folder, "fileName": name, "size": size}


def _get_file(store: Store, folder: str | None, name: str) -> Response:
    try:
        path = store.resource_path(folder, name)
        return Response(path.read_bytes(), media_type="application/octet-stream")
    except InvalidName as exc:
        raise HTTPException(400, str(exc)) from exc
    except FileNotFoundError as exc:
        raise HTTPException(404, "no such file") from exc


@guarded.put("/files/{name}", status_code=201)
async def put_root_file(name: str, request: Request, store: StoreDep) -> dict:
    return await _put_file(request, store, None, name)


@guarded.put("/files/{folder}/{name}", status_code=201)
async def put_file(folder: str, name: str, request: Request, store: StoreDep) -> dict:
    return await _put_file(request, store, folder, name)


@guarded.get("/files/{name}")
def get_root_file(name: str, store: StoreDep) -> Response:
    return _get_file(store, None, name)


@guarded.get("/files/{folder}/{name}")
def get_file(folder: str, name: str, store: StoreDep) -> Response:
    return _get_file(store, folder, name)


def _delete_file(store: Store, folder: str | None, name: str) -> None:
    try:
        if not store.delete_resource(folder, name):
            raise HTTPException(404, "no such file")
    except InvalidName as exc:
        raise HTTPException(400, str(exc)) from exc


@guarded.delete("/files/{name}", status_code=204)
def delete_root_file(name: str, store: StoreDep) -> None:
    _delete_file(store, None, name)


@guarded.delete("/files/{folder}/{name}", status_code=204)
def delete_file(folder: str, name: str, store: StoreDep) -> None:
    _delete_file(store, folder, name)


# --- compromise: an attacker who controls the API (contract section 9) ---------------------------------
# The files installed here are what POST /resources/get serves in place of the real ones (a withheld one is a
# 404), encrypted for the caller exactly as real ones are; GET /files still shows the real ones, and DELETE
# /compromise ends it all, so the real files are served again.


def _compromise(store: Store, folder: str | None, name: str, action) -> None:
    try:
        store.resource_path(folder, name)
    except InvalidName as exc:
        raise HTTPException(400, str(exc)) from exc
    action(folder, name)


async def _put_substitute(request: Request, store: Store, folder: str | None, name: str) -> dict:
    body = await request.body()  # a small part, a manifest or a cdn.yaml: small
    _compromise(store, folder, name, lambda f, n: store.put_substitute(f, n, body))
    return {"folder": folder, "fileName": name, "size": len(body)}


@guarded.get("/compromise")
def compromised(store: StoreDep) -> dict[str, list[str]]:
    return store.compromised()


@guarded.delete("/compromise", status_code=204)
def end_compromise(store: StoreDep) -> None:
    store.end_compromise()


@guarded.put("/compromise/files/{name}", status_code=201)
async def substitute_root_file(name: str, request: Request, store: StoreDep) -> dict:
    return await _put_substitute(request, store, None, name)


@guarded.put("/compromise/files/{folder}/{name}", status_code=201)
async def substitute_file(folder: str, name: str, request: Request, store: StoreDep) -> dict:
    return await _put_substitute(request, store, folder, name)


@guarded.put("/compromise/withheld/{name}", status_code=204)
def withhold_root_file(name: str, store: StoreDep) -> None:
    _compromise(store, None, name, store.withhold)


@guarded.put("/compromise/withheld/{folder}/{name}", status_code=204)
def withhold_file(folder: str, name: str, store: StoreDep) -> None:
    _compromise(store, folder, name, store.withhold)


@guarded.get("/counters")
def counters(request: Request) -> dict[str, int]:
    return request.app.state.faults.counters()


@guarded.delete("/counters", status_code=204)
def reset_counters(request: Request) -> None:
    request.app.state.faults.reset_counters()


@guarded.get("/faults")
def faults(request: Request) -> list[dict]:
    return request.app.state.faults.list()


@guarded.post("/faults", status_code=201)
def add_fault(body: FaultSpec, request: Request) -> dict:
    try:
        request.app.state.faults.add(Fault(**body.model_dump()))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    return body.model_dump()


@guarded.delete("/faults", status_code=204)
def clear_faults(request: Request) -> None:
    request.app.state.faults.clear()


admin_router.include_router(guarded)
