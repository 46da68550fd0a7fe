"""Real processes: the devstack (SeaweedFS + reference Resource API), a fault proxy in front of the CDN,
and the loader started as ``python main.py`` against them."""

import uuid

import pytest
import requests

from devstack.processes.faultproxy import FaultProxy
from devstack.processes.loader import LoaderProcess
from devstack.split import ensure_bucket
from devstack.stack import Stack
from devstack.wait import until

PASSWORD = "Pa55-word!"


def wait_out_the_tokens(stack, email, password=PASSWORD):
    """Return once the tokens the API has issued so far have expired (with a TTL of a second, see
    Stack.set_token_ttl): it refuses a token issued now, which expires no sooner than any before it."""
    http = requests.Session()
    http.trust_env = False
    login = http.post(f"{stack.api_url}/login", json={"email": email, "password": password}, timeout=10)
    bearer = {"Authorization": f"Bearer {login.json()['token']}"}
    url = f"{stack.api_url}/binary-split/key-fragment"
    until(lambda: http.get(url, headers=bearer, timeout=10).status_code == 401, 30, "the token never expired")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        # The CDN as deployed has the models bucket: the uploader identity may not create buckets, so a test
        # whose first act is an upload through the loader would otherwise get a 403 from the CDN.
        ensure_bucket(s.s3_admin_client(), "models")
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
