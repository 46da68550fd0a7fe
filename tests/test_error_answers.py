"""error_answers: every exception that leaves a route is a JSON detail that never echoes the request's input,
and at most one log line."""

import asyncio
import json
import logging

import main
from tests.fakes import (
    UploaderStore,
    fake_services,
)


def test_validation_errors_name_fields_but_never_echo_values(client):
    r = client.post("/login", json={"email": ["s3cret-value"], "password": "hunter2-secret"})
    assert r.status_code == 422
    assert "s3cret-value" not in r.text and "hunter2-secret" not in r.text
    assert r.json()["detail"].startswith("invalid request: body.email")


class Failing:
    """Services whose login fails with an exception no handler knows."""

    def authenticate(self, email, password):
        raise RuntimeError("internal state with password=hunter2")


def test_unexpected_exceptions_are_a_plain_500(client, monkeypatch):
    failing = fake_services()
    failing.authenticate = Failing().authenticate
    monkeypatch.setitem(main.app.dependency_overrides, main.built_services, lambda: failing)
    r = client.post("/login", json={"email": "a@b", "password": "hunter2"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}


def test_a_client_that_goes_away_mid_upload_is_one_line_not_a_traceback(loader_env, caplog):
    """The soak met it: an upload whose client gave up while the loader waited for the Resource API was a
    500 with an ERROR and a traceback once its body was read."""
    main.use_services(lambda s: fake_services(store=UploaderStore()))
    part = b'--xyz\r\nContent-Disposition: form-data; name="folder"\r\n\r\nmodels\r\n'
    messages = [{"type": "http.request", "body": part, "more_body": True}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload/m.bin",
        "raw_path": b"/upload/m.bin",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "http_version": "1.1",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 40000),
        "headers": [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=xyz")],
    }
    with caplog.at_level(logging.INFO):
        asyncio.run(main.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {"detail": "the client went away before its request was read"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("went away" in r.getMessage() for r in caplog.records)
