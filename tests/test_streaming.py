"""streaming: a load's answer announces its Content-Length; a failure after it began cuts it off with one
warning, never a server error."""

import http.client
import logging
import threading

import pytest

import errors
import main
from devstack.wait import until
from tests.fakes import fake_services


class CutOffStore:
    """A store whose every load announces 3 MiB, sends one MiB and then fails its check."""

    def load(self, folder, name):
        import binary_split

        def chunks():
            yield b"x" * 2**20
            raise errors.IntegrityError("block 1 of models/m.bin does not match its manifest")

        return binary_split.Plaintext(3 * 2**20, chunks())


def test_a_load_cut_off_after_its_answer_began_is_one_warning_and_no_server_error(loader_env, caplog):
    """The soak's logs showed uvicorn's ERROR beside the loader's warning for each cut-off load: the ASGI
    app ended without finishing the body, which is how the loader cuts it off on purpose."""
    import socket

    import uvicorn

    main.use_services(lambda s: fake_services(store=CutOffStore()))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(main.create_app(), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    until(lambda: server.started)
    try:
        conn = http.client.HTTPConnection(*sock.getsockname(), timeout=30)
        conn.request(
            "POST", "/load/m.bin", body=b'{"folder": "models"}', headers={"Content-Type": "application/json"}
        )
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("Content-Length") == str(3 * 2**20)
        with pytest.raises(http.client.IncompleteRead):  # the server closes it after logging
            answer.read()
        conn.close()
    finally:
        server.should_exit = True
        thread.join(30)
    cut = [r for r in caplog.records if "cut off after its answer began" in r.getMessage()]
    assert [(r.name, r.levelname) for r in cut] == [("loader", "WARNING")]
    assert "block 1 of models/m.bin does not match its manifest" in cut[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
