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
