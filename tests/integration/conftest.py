"""Real processes: the devstack (SeaweedFS + reference Resource API), a fault proxy in front of the CDN,
and the loader started as ``python main.py`` against them."""

import uuid

import pytest

from devstack.faultproxy import FaultProxy
from devstack.loader import LoaderProcess
from devstack.stack import Stack

PASSWORD = "Pa55-word!"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="session")
def cdn_proxy(stack):
    """Every loader reaches the CDN through this proxy, so tests can cut, fail and count transfers."""
    with FaultProxy(stack.s3_endpoint) as proxy:
        stack.write_cdn_yaml(host=proxy.url)
        yield proxy


@pytest.fixture
def proxy(cdn_proxy):
    cdn_proxy.clear_faults()
    cdn_proxy.reset_counts()
    yield cdn_proxy
    cdn_proxy.clear_faults()


@pytest.fixture
def user(stack):
    """A fresh Operator account (fresh hardware binding) for each test."""
    email = f"op-{uuid.uuid4().hex[:8]}@azaion.local"
    stack.add_user(email, PASSWORD, ["Operator"])
    return email


@pytest.fixture
def uploader(stack):
    email = f"up-{uuid.uuid4().hex[:8]}@azaion.local"
    stack.add_user(email, PASSWORD, ["ResourceUploader"])
    return email


@pytest.fixture
def loader(stack, proxy, tmp_path):
    with LoaderProcess(tmp_path / "loader", RESOURCE_API_URL=stack.api_url, API_TIMEOUT=5) as process:
        yield process
