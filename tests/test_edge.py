"""edge: the middleware every request passes; a /load client that reads nothing for the client stall time
is let go, and its load's buffers freed."""

import logging
import threading

import main
from devstack.wait import until
from tests.fakes import FakeUnlockStatus, NoSession, fake_services, served, status_of_served


class EndlessStore:
    """A store whose every load is 1 GiB of 4 MiB chunks; ``closed`` is set once a load's chunks are closed
    (the loader let its buffers go)."""

    def __init__(self):
        self.closed = threading.Event()

    def load(self, folder, name):
        import binary_split

        def chunks():
            try:
                while True:
                    yield b"x" * 4 * 2**20
            finally:
                self.closed.set()

        return binary_split.Plaintext(2**30, chunks())


def test_a_client_that_reads_nothing_is_cut_off_after_the_stall_time_and_its_buffers_freed(
    loader_env, monkeypatch, caplog
):
    import socket

    monkeypatch.setenv("CLIENT_STALL_TIMEOUT", "1")
    main.settings.cache_clear()
    store = EndlessStore()
    main.use_services(lambda s: fake_services(store=store, api=NoSession(), unlock_status=FakeUnlockStatus()))
    caplog.set_level(logging.INFO)
    with served(main.create_app()) as address:
        stalled = socket.create_connection(address)
        body = b'{"folder": "models"}'
        stalled.sendall(
            b"POST /load/m.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        # The client reads nothing: within the stall time (and a margin) its load is let go.
        assert store.closed.wait(15), "the stalled load's chunks were never closed"
        until(lambda: not [o for o in status_of_served(address)["operations"] if o["kind"] == "stream"])
        stalled.settimeout(10)
        received = 0
        try:
            while chunk := stalled.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted: what was queued for it is gone too
        assert received < 2**30  # a broken transfer, never a whole answer
        stalled.close()
    cut = [r.getMessage() for r in caplog.records if "cut off after its answer began" in r.getMessage()]
    assert len(cut) == 1 and "the client read nothing for 1 s" in cut[0]
