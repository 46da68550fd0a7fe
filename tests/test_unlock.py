"""unlock's Unlocker against a fake Docker Engine (tests.fakes.ApiServer) and a fake Resource API:
what an unlock reports when the archive or the Engine fails."""

import os

import pytest

import security
from credentials import Credentials
from devstack.wait import until
from tests.fakes import DROP, STALL, ApiServer
from unlock import Unlocker, _engine_address
from unlock_state import UnlockStatus

CREDS = Credentials("up@azaion.local", "pw")


class FakeApi:
    def __init__(self, fragment=b"fragment"):
        self.fragment = fragment

    def login(self, credentials):
        return None

    def key_fragment(self):
        return self.fragment


@pytest.fixture
def engine():
    """``engine(route)``: a fake Docker Engine that answers /version, and ``route`` for anything else."""
    servers = []

    def make(route):
        def answer(method, path, body, headers):
            if path.endswith("/version"):
                return 200, {"ApiVersion": "1.41", "Version": "20.10.0"}
            return route(method, path, body, headers)

        servers.append(ApiServer(answer))
        return "tcp://" + servers[-1].url.removeprefix("http://")

    yield make
    for server in servers:
        server.close()


def unlock(images_path, docker_host, api=None, **options):
    status = UnlockStatus()
    Unlocker(api or FakeApi(), status, str(images_path), docker_host=docker_host, **options).start(CREDS)
    until(lambda: status.snapshot()["state"] in ("ready", "error"), what="the unlock did not end", every=0.02)
    return status.snapshot()


def test_an_archive_that_cannot_be_read_is_a_storage_error(tmp_path, engine):
    archive = tmp_path / "images.enc"
    archive.mkdir()  # it has a size, but cannot be opened for reading
    status = unlock(archive, engine(lambda *a: (500, b"")))
    assert status["state"] == "error"
    assert status["error"] == f"the image archive at {archive} cannot be read (Is a directory)"


def test_a_missing_archive_is_named(tmp_path, engine):
    status = unlock(tmp_path / "none.enc", engine(lambda *a: (500, b"")))
    assert status["error"] == f"the image archive is missing at {tmp_path / 'none.enc'}"


def test_an_engine_that_drops_the_load_is_an_engine_error(tmp_path, engine):
    archive = tmp_path / "images.enc"
    archive.write_bytes(security.encrypt(security.archive_key(b"fragment"), os.urandom(100_000)))
    status = unlock(archive, engine(lambda *a: DROP))
    assert status["state"] == "error"
    assert status["error"].startswith("the Docker Engine failed while loading images")


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_an_engine_that_does_not_answer_is_unreachable_at_its_address(tmp_path, where):
    """The soak stopped dockerd and read "the Docker Engine is not configured": the address was set, the
    Engine just did not answer (a socket with no one behind it, a refused connection)."""
    host = f"unix://{tmp_path}/docker.sock" if where == "unix" else "tcp://127.0.0.1:1"
    status = unlock(tmp_path / "images.enc", host)
    assert status["state"] == "error"
    assert status["error"] == f"the Docker Engine at {host} is unreachable (ConnectionError)"


def test_an_engine_that_never_answers_fails_the_unlock_after_the_engine_timeout(tmp_path):
    """An Engine that takes the connection and never answers (a TCP address that drops everything) failed
    the unlock only after the hour a load may take; a question to the Engine has ENGINE_TIMEOUT."""
    silent = ApiServer(lambda *a: STALL)
    try:
        host = "tcp://" + silent.url.removeprefix("http://")
        status = unlock(tmp_path / "images.enc", host, engine_timeout=0.2, load_timeout=3600)
    finally:
        silent.close()
    assert status["state"] == "error"
    assert status["error"] == f"the Docker Engine at {host} is unreachable (ReadTimeout)"


@pytest.mark.parametrize("host", ["bogus://engine", "tcp://user:secret@127.0.0.1:1"])
def test_an_engine_address_the_sdk_refuses_is_invalid_and_never_shown(tmp_path, host):
    status = unlock(tmp_path / "images.enc", host)
    assert status["state"] == "error"
    assert status["error"] == "the Docker Engine's address or TLS settings are invalid (DockerException)"
    assert "secret" not in str(status)


def test_an_engine_address_is_named_without_its_user_and_password():
    assert _engine_address("ssh://user:secret@engine:22") == "ssh://engine:22"
    assert _engine_address("unix:///run/docker.sock") == "unix:///run/docker.sock"
