"""cdn_manager's liveness: the progress rule of fill (a CDN that trickles), the range checks of what the
CDN answers, and the checks of cdn.yaml.

The trickles go through devstack's FaultProxy in front of a fake S3 on a loopback port (the real botocore
clients, a real socket for the watchdog to shut down); bodies that are no socket come from moto's S3."""

import os
import threading
import time

import pytest

from cdn_manager import CdnConfig, CdnManager, ObjectInfo
from constants import MAX_RESOURCE_BYTES
from devstack.faultproxy import FaultProxy
from errors import UpstreamError, UpstreamTimeout
from tests.fakes import STALL, ApiServer
from tests.store_fakes import WrappedClient

KIB = 1024
ETAG = '"e1"'


class FakeS3:
    """One object, answered as S3 does on any path: HEAD, and GET with Range, pinned by If-Match."""

    def __init__(self, data):
        self.data = data
        self.server = ApiServer(self.route)

    def route(self, method, path, body, headers):
        if method == "HEAD":
            return 200, self.data, {"ETag": ETAG}  # the server sends the length, and no body
        if headers.get("If-Match") not in (None, ETAG):
            return 412, b"", {}
        first, _, last = headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        first, last = int(first), int(last or len(self.data) - 1)
        content_range = f"bytes {first}-{last}/{len(self.data)}"
        return 206, self.data[first : last + 1], {"ETag": ETAG, "Content-Range": content_range}


@pytest.fixture
def proxied_cdn():
    """``proxied_cdn(data, **options)``: a CdnManager (real clients, no backoff, ``options``) reaching a
    FakeS3 of ``data`` through a FaultProxy, and the proxy."""
    made = []

    def make(data, **options):
        s3 = FakeS3(data)
        proxy = FaultProxy(s3.server.url).start()
        made.append((s3, proxy))
        options.setdefault("resume_backoff", 0)
        return CdnManager(CdnConfig(proxy.url, ("dk", "ds-secret"), ("uk", "us-secret")), **options), proxy

    yield make
    for s3, proxy in made:
        proxy.stop()
        s3.server.close()


def collect(fill, buf):
    """Every byte ``fill`` reads into ``buf``, taken at each step."""
    return b"".join(bytes(buf[:n]) for n in fill)


def gets(proxy):
    return [s for s in proxy.seen() if s.method == "GET"]


def range_start(seen):
    return int(seen.headers["range"].removeprefix("bytes=").partition("-")[0])


def test_a_trickle_is_dropped_and_resumed_from_its_first_missing_byte(proxied_cdn):
    data = os.urandom(64 * KIB)
    cdn, proxy = proxied_cdn(data, speed_limit=8 * KIB, speed_time=1.0)
    proxy.trickle_next(512, after_bytes=20_000, method="GET")  # then a 16th of the limit
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(16 * KIB))
    started = time.monotonic()
    assert collect(cdn.fill("models", "x.big", info, buf), buf) == data
    # the first window had its bytes, the second did not: dropped then, and resumed at once
    assert time.monotonic() - started < 2 * 1.0 + 1.5
    first, resumed = gets(proxy)
    assert first.headers["range"] == f"bytes=0-{len(data) - 1}"
    at = range_start(resumed)
    assert 20_000 <= at < len(data) and resumed.headers["range"] == f"bytes={at}-{len(data) - 1}"
    assert resumed.headers["if-match"] == first.headers["if-match"] == ETAG
    assert proxy.trickles() == 1


def test_a_transfer_that_keeps_trickling_is_an_upstream_timeout_once_its_resumes_are_spent(proxied_cdn):
    data = os.urandom(64 * KIB)
    cdn, proxy = proxied_cdn(data, speed_limit=8 * KIB, speed_time=0.5, resumes=2)
    proxy.trickle_next(256, after_bytes=3000, n=None, method="GET")
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(16 * KIB))
    started = time.monotonic()
    with pytest.raises(
        UpstreamTimeout, match=r"^the CDN transfer of models/x.big made less than 8192 bytes/s for 0.5 s$"
    ):
        collect(cdn.fill("models", "x.big", info, buf), buf)
    # three transfers, each dropped within two windows of its start
    assert time.monotonic() - started < 3 * 2 * 0.5 + 1.5
    transfers = gets(proxy)
    assert len(transfers) == 3 and {t.headers["if-match"] for t in transfers} == {ETAG}
    starts = [range_start(t) for t in transfers]
    # each resumed where the one before ended: its fast bytes and what it trickled
    assert starts[0] == 0 and 3000 <= starts[1] - starts[0] and 3000 <= starts[2] - starts[1]
    assert all(t.headers["range"].endswith(f"-{len(data) - 1}") for t in transfers)


def test_a_link_above_the_limit_is_never_dropped(proxied_cdn):
    data = os.urandom(96 * KIB)
    cdn, proxy = proxied_cdn(data, speed_limit=16 * KIB, speed_time=1.0)
    proxy.trickle_next(2 * 16 * KIB, method="GET")  # twice the limit: three seconds, three windows
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(16 * KIB))
    started = time.monotonic()
    assert collect(cdn.fill("models", "x.big", info, buf), buf) == data
    assert time.monotonic() - started >= 2.5  # it did trickle through several windows
    assert len(gets(proxy)) == 1


def test_the_time_the_caller_holds_a_buffer_counts_for_no_window(proxied_cdn):
    """A caller slow to take the next step (a load paced by its client) holds the transfer still: the
    connection's buffers fill, then nothing more comes. Neither that time nor those bytes count."""
    data = os.urandom(16 * 1024 * KIB)  # more than the connection's buffers hold
    cdn, proxy = proxied_cdn(data, speed_limit=8 * KIB, speed_time=0.3)
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(1024 * KIB))
    fill = cdn.fill("models", "x.big", info, buf)
    got = [bytes(buf[: next(fill)])]
    time.sleep(1.0)  # held for three windows and more
    got += [bytes(buf[:n]) for n in fill]
    assert b"".join(got) == data
    assert len(gets(proxy)) == 1


def test_a_transfer_told_to_stop_gives_up_without_resuming(proxied_cdn):
    data = os.urandom(64 * KIB)
    cdn, proxy = proxied_cdn(data, speed_limit=8 * KIB, speed_time=1.0)
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(16 * KIB))
    stopped = threading.Event()
    fill = cdn.fill("models", "x.big", info, buf, stop=stopped.is_set)
    assert next(fill) == 16 * KIB
    stopped.set()  # the download this transfer is for has failed
    with pytest.raises(UpstreamError, match="was stopped"):
        next(fill)
    assert len(gets(proxy)) == 1


class SlowFirstBody(WrappedClient):
    """The first GET's body (moto's, no socket) gives ``step`` bytes every 20 ms."""

    def __init__(self, client, step):
        super().__init__(client)
        self.step, self.slowed = step, False

    def _takes(self):
        slow, self.slowed = not self.slowed, True
        return slow

    def wrap(self, body):
        return _Slow(body, self.step)


class _Slow:
    def __init__(self, body, step):
        self._body, self._step = body, step

    def read(self, amt=None):
        time.sleep(0.02)
        return self._body.read(min(amt, self._step))

    def close(self):
        self._body.close()


@pytest.mark.parametrize("limit", [8 * KIB, 0])
def test_a_body_that_is_no_socket_is_judged_at_the_end_of_its_pieces(s3, limit):
    data = os.urandom(4 * KIB)
    s3.put_object(Bucket="models", Key="x.big", Body=data)
    slow = SlowFirstBody(s3, step=64)  # 3.2 KB/s
    cdn = CdnManager(
        download_client=slow, upload_client=s3, speed_limit=limit, speed_time=0.3, resume_backoff=0
    )
    info = cdn.head("models", "x.big")
    buf = memoryview(bytearray(4 * KIB))
    assert collect(cdn.fill("models", "x.big", info, buf), buf) == data
    if limit:  # dropped at the end of the first window, resumed where it was
        first, resumed = slow.gets
        at = int(resumed.removeprefix("bytes=").partition("-")[0])
        assert first == "bytes=0-4095" and resumed == f"bytes={at}-4095" and 0 < at < len(data)
    else:  # the rule is off
        assert slow.gets == ["bytes=0-4095"]


# --- what the CDN answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [str(10**20), str(MAX_RESOURCE_BYTES + 1), "-1", "12abc", ""])
def test_a_head_whose_size_is_out_of_range_is_not_valid(proxied_cdn, length):
    cdn, proxy = proxied_cdn(b"x" * 100)
    proxy.header_next("Content-Length", length, method="HEAD")
    with pytest.raises(UpstreamError, match=r"^the CDN's answer for models/x.big is not valid: "):
        cdn.head("models", "x.big")
    proxy.header_next("Content-Length", str(MAX_RESOURCE_BYTES), method="HEAD")
    assert cdn.head("models", "x.big").size == MAX_RESOURCE_BYTES  # the largest there may be
    assert cdn.head("models", "x.big").size == 100


@pytest.mark.parametrize("etag", ["", "e" * 2000, "caf\u00e9"])
def test_a_head_whose_etag_is_not_short_printable_text_is_not_valid(proxied_cdn, etag):
    cdn, proxy = proxied_cdn(b"x" * 100)
    proxy.header_next("ETag", etag, method="HEAD")
    with pytest.raises(UpstreamError, match=r"^the CDN's answer for models/x.big is not valid: an ETag"):
        cdn.head("models", "x.big")


@pytest.mark.parametrize("size", [-1, MAX_RESOURCE_BYTES + 1, 10**20, True, 1.0, "5", None])
def test_object_info_refuses_a_size_out_of_range(size):
    with pytest.raises(UpstreamError, match=r"^the CDN's answer for models/x.big is not valid: a size of "):
        ObjectInfo(size, ETAG, "models/x.big")


def test_object_info_takes_every_size_in_range():
    assert [ObjectInfo(n, ETAG).size for n in (0, 1, MAX_RESOURCE_BYTES)] == [0, 1, MAX_RESOURCE_BYTES]
    with pytest.raises(UpstreamError, match="an ETag"):
        ObjectInfo(1, None)


def test_a_head_the_cdn_does_not_answer_in_time_is_an_upstream_timeout():
    silent = ApiServer(lambda *a: STALL)
    try:
        config = CdnConfig(silent.url, ("dk", "ds-secret"), ("uk", "us-secret"))
        cdn = CdnManager(
            download_client=config.client("downloader", read_timeout=0.2), upload_client=object()
        )
        with pytest.raises(UpstreamTimeout, match=r"the CDN did not answer in time \(ReadTimeoutError\)"):
            cdn.head("models", "x.big")
    finally:
        silent.close()


# --- cdn.yaml -----------------------------------------------------------------------------------------


def cdn_yaml(**fields):
    values = {
        "host": "http://127.0.0.1:8333",
        "downloader_access_key": "dk",
        "downloader_access_secret": "ds-secret",
        "uploader_access_key": "uk",
        "uploader_access_secret": "us-secret",
        **fields,
    }
    return "".join(f"{k}: {v}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize(
    "host",
    [
        "file:///etc/passwd",
        "127.0.0.1:9000",
        "localhost:9000",
        '"http://[::1"',
        "ftp://cdn.example.com",
        "http://",
        "http://:9000",
        "http://user:pw@cdn.example.com",
        "http://cdn.example.com:99999",
        "http://cdn.example.com:port",
        "http://cdn.example.com/?x=1",
        "http://cdn.example.com/#f",
        '"http://cdn example.com"',
        "[http://cdn.example.com]",
        "{a: 1}",
        "12",
    ],
)
def test_cdn_yaml_refuses_a_host_that_is_no_http_url(host):
    with pytest.raises(UpstreamError) as refused:
        CdnConfig.from_yaml(cdn_yaml(host=host))
    assert refused.value.detail == "cdn.yaml is not valid: host must be an http(s) URL"


@pytest.mark.parametrize(
    "host",
    ["http://127.0.0.1:8333", "https://cdn.example.com", "http://[::1]:9000", "HTTPS://CDN.example.com/s3"],
)
def test_cdn_yaml_takes_an_http_url(host):
    assert CdnConfig.from_yaml(cdn_yaml(host=host)).host == host


@pytest.mark.parametrize("region", ["us east", "x" * 64, "-us", "[us-east-1]", "us_east"])
def test_cdn_yaml_refuses_a_region_that_is_no_plain_name(region):
    with pytest.raises(UpstreamError, match=r"^cdn.yaml is not valid: region must be"):
        CdnConfig.from_yaml(cdn_yaml(region=region))
    assert CdnConfig.from_yaml(cdn_yaml(region="eu-central-1")).region == "eu-central-1"
    assert CdnConfig.from_yaml(cdn_yaml()).region == "us-east-1"


@pytest.mark.parametrize("secret", ["[a, b]", "{a: b}", '"two words"', '"tab\\there"', "1.5"])
def test_cdn_yaml_refuses_keys_that_are_no_short_text_and_never_quotes_them(secret):
    with pytest.raises(UpstreamError) as refused:
        CdnConfig.from_yaml(cdn_yaml(uploader_access_secret=secret))
    assert (
        refused.value.detail == "cdn.yaml is not valid: uploader_access_secret must be a short printable text"
    )
    assert refused.value.__cause__ is None


def test_a_cdn_client_botocore_will_not_build_is_an_upstream_error():
    """A host that passes the checks of cdn.yaml but that botocore refuses as it builds a client (a host
    name with an underscore) is the same 502, never a ValueError (a 500)."""
    config = CdnConfig.from_yaml(cdn_yaml(host="http://bad_host_name"))
    with pytest.raises(UpstreamError) as refused:
        CdnManager(config)
    assert refused.value.detail == "cdn.yaml is not valid: the CDN client could not be built (ValueError)"
    assert refused.value.__cause__ is None


def test_the_progress_rule_takes_only_sensible_settings(s3):
    for limit, seconds in ((-1, 30.0), (16 * KIB, 0), (16 * KIB, -1.0)):
        with pytest.raises(ValueError):
            CdnManager(download_client=s3, upload_client=s3, speed_limit=limit, speed_time=seconds)
    assert CdnManager(download_client=s3, upload_client=s3, speed_limit=0, speed_time=0).speed_limit == 0
