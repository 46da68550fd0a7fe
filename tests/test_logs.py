"""logs: the loader's log level (a library's retry warning told once, in the loader's words) and request
paths made printable (a newline cannot forge a log line)."""

import logging

import pytest

import logs
from credentials import Credentials
from tests.fakes import DROP, ApiServer, make_token


def test_a_newline_in_a_request_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="loader")
    client.get("/health%0aINFO%20loader%20forged")
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()]
    assert not [line for line in lines if line.startswith("INFO loader forged")]
    assert any("/health\\nINFO loader forged" in line for line in lines)


@pytest.fixture
def library_log_levels():
    """The library loggers' levels, put back after a test that runs logs.configure_logging."""
    names = ("botocore", "boto3", "s3transfer", "urllib3", "urllib3.connectionpool", "docker")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_resource_api_retry_is_told_once_in_the_loaders_words(caplog, library_log_levels):
    import api_client

    def warnings_of_a_retried_login():
        answers = iter([DROP, (200, {"token": make_token({"nameid": "u1", "role": "Operator"})})])
        server = ApiServer(lambda m, p, b, h: next(answers))
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                api_client.ResourceApi(server.url, lambda: "hw", backoff=0).login(Credentials("a@b", "pw"))
        finally:
            server.close()
        return [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]

    assert "urllib3.connectionpool" in {name for name, _ in warnings_of_a_retried_login()}  # it tells it too
    logs.configure_logging("INFO")
    assert warnings_of_a_retried_login() == [("loader.api", "POST /login attempt 1: ProtocolError: retrying")]
