"""Shared test setup: the compiled modules live at the repository root (built in place by `make test`)."""

import shutil
import subprocess

import boto3
import pytest
from moto import mock_aws


class Openssl:
    """`openssl enc -aes-256-cbc` with a raw key and IV, the contract's reference for the crypto."""

    def __init__(self, path):
        self.path = path

    def encrypt(self, key, iv, data):
        return self._enc([], key, iv, data)

    def decrypt(self, key, iv, data):
        return self._enc(["-d"], key, iv, data)

    def _enc(self, flags, key, iv, data):
        argv = [self.path, "enc", *flags, "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex()]
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.fixture(scope="session")
def openssl():
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("openssl is required (scripts/system-deps installs it)")
    return Openssl(path)


@pytest.fixture(scope="session")
def _s3_client():
    """One boto3 client for every test: building one costs a tenth of a second of CPU or more, and a client
    answers from whichever moto mock is active."""
    with mock_aws():
        return boto3.client("s3", region_name="us-east-1")


@pytest.fixture
def s3(_s3_client):
    """moto's in-process S3, empty for each test but for the bucket "models"."""
    with mock_aws():
        _s3_client.create_bucket(Bucket="models")
        yield _s3_client


@pytest.fixture
def loader_env(tmp_path, monkeypatch):
    """Settings for an app of main.py whose Resource API is unreachable; the test starts from no Services,
    built by Services.from_settings unless it names its own (main.use_services)."""
    import main

    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RESOURCE_API_URL", "http://127.0.0.1:9")
    main.settings.cache_clear()
    main.use_services()
    yield
    main.settings.cache_clear()
    main.use_services()


@pytest.fixture
def client(loader_env):
    from fastapi.testclient import TestClient

    import main
    from tests.fakes import LOCAL

    with TestClient(main.app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def prefetching(loader_env):
    """A client of an app whose store prefetches from PREFETCH_ANSWERS, its cache a BudgetCache."""
    from fastapi.testclient import TestClient

    import main
    from tests.fakes import (
        LOCAL,
        PREFETCH_ANSWERS,
        BudgetCache,
        FakeUnlockStatus,
        NoSession,
        PrefetchStore,
        fake_services,
    )

    store, cache = PrefetchStore(PREFETCH_ANSWERS, held={"held.bin"}), BudgetCache()
    main.use_services(
        lambda s: fake_services(store=store, cache=cache, api=NoSession(), unlock_status=FakeUnlockStatus())
    )
    with TestClient(main.app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c, store, cache


pytest_plugins = ["tests.support.docker_fixtures"]

# The fixtures that start SeaweedFS, the Resource API, a loader or dockerd. `make unit` runs every test not
# marked integration or docker, so a test that uses one of these (itself or through another fixture) must
# carry one of those marks.
PROCESS_FIXTURES = {"stack", "loader", "dockerd", "private_dockerd"}


def pytest_collection_modifyitems(items):
    unmarked = [
        item.nodeid
        for item in items
        if PROCESS_FIXTURES & set(item.fixturenames)
        and not (item.get_closest_marker("integration") or item.get_closest_marker("docker"))
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that start processes need the integration or docker mark: {unmarked}")
