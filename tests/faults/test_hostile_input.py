"""Hostile input at the loader's own HTTP API: fuzzing from its OpenAPI schema, and bodies far over the
configured limits (announced with Content-Length, or chunked with none)."""

import json
import select
import socket

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from devstack.processes.loader import proc_field
from tests.faults.conftest import PASSWORD, MiB, files_under, start_loader

pytestmark = pytest.mark.integration

MAX_JSON = 4096
MAX_UPLOAD = 1 * MiB
HUGE = 200 * MiB
# Loopback socket buffers can swallow a few MiB before the sender notices anything; a server that reads
# a refused body to its end lets all of it through.
MAX_ACCEPTED = 48 * MiB
MAX_GROWTH_KIB = 48 * 1024

# Every operation of the loader's schema; a new route must be added here, so none escapes the fuzzing.
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/status"),
    ("POST", "/login"),
    ("POST", "/load/{filename}"),
    ("POST", "/prefetch/{filename}"),
    ("GET", "/downloads"),
    ("POST", "/upload/{filename}"),
    ("POST", "/unlock"),
    ("GET", "/unlock/status"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def limited(stack, tmp_path_factory):
    """A loader with small limits; unlock goes nowhere (no archive, no Docker Engine at DOCKER_HOST)."""
    workdir = tmp_path_factory.mktemp("limited")
    env = {
        "MAX_JSON_BYTES": MAX_JSON,
        "MAX_UPLOAD_BYTES": MAX_UPLOAD,
        "DOCKER_HOST": f"unix://{workdir}/no-docker.sock",
        "IMAGES_PATH": workdir / "no-archive.enc",
    }
    with start_loader(workdir / "loader", stack, **env) as process:
        yield process


@pytest.fixture(scope="module")
def schema(limited):
    loaded = schemathesis.openapi.from_url(limited.url + "/openapi.json", timeout=30)
    found = sorted((op.ok().method.upper(), op.ok().path) for op in loaded.get_all_operations())
    assert found == sorted(OPERATIONS), "the loader's routes changed: update OPERATIONS"
    return loaded


# --- fuzzing --------------------------------------------------------------------------------------


def assert_error_body(response):
    """Beyond the schema: every error is JSON {"detail": text}, never a stack trace."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]  # lower-case names, lists of values
    assert content_type.startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), body
    assert "Traceback" not in body["detail"]


def fuzz(schema, loader, method, path):
    operation = schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=30,
        deadline=None,
        database=None,  # nothing written to the working tree
        derandomize=True,  # the same cases every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case):
        response = case.call_and_validate(
            base_url=loader.url,
            checks=[not_a_server_error, response_schema_conformance],
            timeout=60,
        )
        assert_error_body(response)

    run()


@pytest.mark.parametrize("session", ["anonymous", "logged-in"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(schema, limited, user, method, path, session):
    """Reliability: schema-driven fuzzing of every operation (schemathesis, 30 valid + invalid examples each,
    logged in or not) | no 5xx, every response matches the OpenAPI schema, every error is JSON {"detail":
    text}"""
    if session == "logged-in":
        assert limited.login(user, PASSWORD).status_code == 200
    else:
        limited.post("/login", json={"email": "nobody@azaion.local", "password": "x"})  # fails: no session
    fuzz(schema, limited, method, path)


# --- bodies over the limits -----------------------------------------------------------------------


def body_pieces(size, prefix, chunked):
    """``prefix`` and then zeros, ``size`` bytes in all, a MiB at a time (framed when ``chunked``)."""
    zeros = bytes(MiB)

    def raw():
        yield prefix
        left = size - len(prefix)
        while left > 0:
            piece = zeros[: min(MiB, left)]
            left -= len(piece)
            yield piece

    for piece in raw():
        if piece:
            yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def whole_answer(answer):
    head, sep, body = answer.partition(b"\r\n\r\n")
    lengths = [ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(body) >= int(lengths[0])


def send_huge(port, path, headers, size, *, chunked, prefix=b""):
    """POST a ``size``-byte body without ever holding it, and stop sending at the first answer.

    Returns the status, the body of the answer, and how many bytes the loader's socket accepted.
    """
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
    pieces = body_pieces(size, prefix, chunked)
    pending, accepted, answer = head.encode() + b"\r\n", 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        while not whole_answer(answer):
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 60)
            if not readable and not writable:
                raise TimeoutError("the loader neither read the body nor answered within 60 s")
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    break
                answer += data
                continue
            try:
                sent = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                pending = b""  # the loader stopped reading: wait for its answer
                continue
            accepted += sent
            pending = pending[sent:] or next(pieces, b"")
    head, _, body = answer.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else None), body, accepted


def assert_refused_unread(loader, sent, before_kib):
    status, body, accepted = sent
    assert status == 413, (status, body[:200])
    assert "larger than" in json.loads(body)["detail"]
    assert accepted < MAX_ACCEPTED, f"the loader took {accepted} bytes of a refused body"
    growth = proc_field(loader.pid, "VmHWM") - before_kib
    assert growth < MAX_GROWTH_KIB, f"the loader's peak memory grew by {growth} KiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/login", "/load/m.bin", "/prefetch/m.bin", "/unlock"])
def test_oversized_json_is_413_unread(limited, path, chunked):
    """Reliability: 200 MB JSON body over MAX_JSON_BYTES, with Content-Length or chunked | 413 before the body
    is read; the loader's memory does not grow by the body"""
    limited.get("/status")  # the compiled modules are loaded before memory is measured
    before = proc_field(limited.pid, "VmHWM")
    sent = send_huge(limited.port, path, {"Content-Type": "application/json"}, HUGE, chunked=chunked)
    assert_refused_unread(limited, sent, before)
    assert limited.get("/health").status_code == 200


UPLOAD_TYPE = {"Content-Type": "multipart/form-data; boundary=XyZ"}


def part(name, filename=None):
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("field", ["data", "other"])
def test_oversized_upload_is_413_unread(limited, uploader, chunked, field):
    """Reliability: 200 MB upload over MAX_UPLOAD_BYTES, with Content-Length or chunked, in the file field or
    in another field | 413 after at most the limit is read; nothing held in memory, no staging file left"""
    assert limited.login(uploader, PASSWORD).status_code == 200
    before = proc_field(limited.pid, "VmHWM")
    prefix = part("folder") + b"models\r\n" + part(field, "m.bin" if field == "data" else None)
    sent = send_huge(limited.port, "/upload/m.bin", UPLOAD_TYPE, HUGE, chunked=chunked, prefix=prefix)
    assert_refused_unread(limited, sent, before)
    assert not [f for f in files_under(limited.env["MODEL_CACHE_DIR"]) if f.startswith(".staging")]
    assert limited.get("/health").status_code == 200
