"""operations: what the routes ask of the compiled modules; a login and what it starts in the background."""

import threading

import pytest

import errors
from credentials import Credentials
from tests.fakes import fake_services


class SigningIn:
    """A Resource API session whose every login succeeds."""

    def login(self, creds):
        assert isinstance(creds, Credentials)
        return "the user"


class Preparing:
    """A store that notes each call of what a login starts in the background, with its thread, and sets
    ``resumed`` once the interrupted prefetches were resumed."""

    def __init__(self):
        self.calls = []
        self.resumed = threading.Event()

    def prepare(self):
        self.calls.append(("prepare", threading.current_thread()))

    def resume_prefetches(self):
        self.calls.append(("resume_prefetches", threading.current_thread()))
        self.resumed.set()


def test_a_login_prepares_the_cdn_clients_then_resumes_the_prefetches_in_the_background():
    # The first load then finds cdn.yaml fetched and the CDN clients built; then the prefetches a restart
    # interrupted go on, with the clients ready.
    store = Preparing()
    svc = fake_services(api=SigningIn(), store=store)
    assert svc.authenticate("u@example.com", "pw") == "the user"
    assert store.resumed.wait(5)
    assert [name for name, _ in store.calls] == ["prepare", "resume_prefetches"]
    threads = {thread for _, thread in store.calls}
    assert len(threads) == 1 and threading.current_thread() not in threads


class RefusingSignIn:
    """A Resource API session whose every login is refused."""

    def login(self, creds):
        raise errors.AuthError("invalid email or password")


def test_a_failed_login_resumes_no_prefetch():
    store = Preparing()
    svc = fake_services(api=RefusingSignIn(), store=store)
    with pytest.raises(errors.AuthError):
        svc.authenticate("u@example.com", "wrong")
    svc.api = SigningIn()
    svc.authenticate("u@example.com", "pw")
    assert store.resumed.wait(5)
    # One prepare and one resume, those of the login that succeeded (started after the failed one).
    assert [name for name, _ in store.calls] == ["prepare", "resume_prefetches"]
