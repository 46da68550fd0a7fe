"""Shared test setup: the compiled modules live at the repository root (built in place by `make test`)."""

import shutil

import boto3
import pytest
from moto import mock_aws


@pytest.fixture(scope="session")
def openssl():
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("openssl is required (scripts/system-deps installs it)")
    return path


@pytest.fixture
def s3():
    """moto's in-process S3 with the bucket "models"."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="models")
        yield client


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
        raise pytest.UsageError(f"these tests start processes but are not marked integration: {unmarked}")
