"""cdn_manager's liveness: the progress rule of fill (a CDN that trickles), the bandwidth cap (Throttle, on
a clock of the test's), the range checks of what the CDN answers, and the checks of cdn.yaml; a body that
breaks off resumed a bounded number of times (pinned to the ETag), botocore's retries the only ones, and
uploads sent unhashed.

The trickles go through devstack's FaultProxy in front of a fake S3 on a loopback port (the real botocore
clients, a real socket for the watchdog to shut down); bodies that are no socket come from moto's S3."""

import math
import os
import threading
import time

import pytest

from cdn_manager import THROTTLE_POLL, CdnConfig, CdnManager, ObjectInfo, Throttle
from constants import CDN_ATTEMPTS, CDN_RESUMES, MAX_RESOURCE_BYTES
from devstack.processes.faultproxy import FaultProxy
from errors import (
    IntegrityError,
    StorageError,
    UpstreamError,
    UpstreamTimeout,
)
from security import tail_start
from tests.fakes import DROP, STALL, ApiServer
from tests.store_fakes import (
    BLOCK,
    YAML,
    FlakyClient,
    WrappedClient,
    load,
    make_store,
    publish,
)

KIB = 1024
MIB = 1024 * KIB
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


# --- the bandwidth cap --------------------------------------------------------------------------------


class VirtualClock:
    """Time for a Throttle that passes only when each of the test's ``threads`` sleeps: it then jumps to
    the earliest wake. The takers' schedule is so exact, and the test takes no time."""

    def __init__(self, threads=1):
        self.now = 0.0
        self.sleeps = []
        self._threads = threads
        self._asleep = []  # [wake] of each sleeping thread
        self._cond = threading.Condition()

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        with self._cond:
            self.sleeps.append(seconds)
            me = [self.now + seconds]
            self._asleep.append(me)
            self._advance()
            while any(s is me for s in self._asleep):
                self._cond.wait()

    def done(self):
        """The calling thread takes no more part (it will not sleep again)."""
        with self._cond:
            self._threads -= 1
            self._advance()

    def _advance(self):
        if self._asleep and len(self._asleep) == self._threads:
            self.now = max(self.now, min(wake for (wake,) in self._asleep))
            self._asleep = [s for s in self._asleep if s[0] > self.now]
            self._cond.notify_all()


def run_takers(throttle, clock, takes):
    """Each of ``takes`` (one list of sizes per thread) taken in turn on a thread of its own: every take's
    (time it returned, thread, size), in the order they returned."""
    got = []

    def taker(i, sizes):
        try:
            for n in sizes:
                throttle.take(n)
                got.append((clock(), i, n))
        finally:
            clock.done()

    threads = [threading.Thread(target=taker, args=(i, sizes)) for i, sizes in enumerate(takes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return sorted(got)


def test_a_throttle_keeps_one_taker_to_its_rate():
    clock = VirtualClock()
    throttle = Throttle(1_000_000, clock=clock, sleep=clock.sleep)
    got = run_takers(throttle, clock, [[100_000] * 30])
    # after the burst, each take waits for its bytes' time at the rate
    assert [t for t, _, _ in got] == pytest.approx([k * 0.1 - Throttle.BURST for k in range(1, 31)])
    assert max(clock.sleeps) <= THROTTLE_POLL


@pytest.mark.parametrize("threads", [2, 5])
def test_a_throttle_shares_its_rate_among_all_its_takers_in_turn(threads):
    """Two (or five) threads each taking 4 MiB at a time against 20 MB/s: 20 MB/s together, each in turn."""
    rate, n = 20_000_000, 4 * MIB
    clock = VirtualClock(threads)
    throttle = Throttle(rate, clock=clock, sleep=clock.sleep)
    got = run_takers(throttle, clock, [[n] * (30 // threads)] * threads)
    assert [t for t, _, _ in got] == pytest.approx([k * n / rate - Throttle.BURST for k in range(1, 31)])
    last = got[-1][0]
    assert last > 6  # a few seconds of takes
    assert sum(n for _, _, n in got) / last == pytest.approx(rate, rel=0.02)
    order = [i for _, i, _ in got]
    assert order == order[:threads] * (30 // threads)  # each thread in turn, none twice in a row
    assert sorted(order[:threads]) == list(range(threads))


def test_a_throttle_without_a_cap_never_waits_nor_looks_at_the_clock():
    def never():
        raise AssertionError("looked at the clock")

    throttle = Throttle(0, clock=never, sleep=lambda s: never())
    for n in (1, 10**12, 10**15):
        throttle.take(n)
    assert throttle.rate == 0


def test_a_new_rate_applies_to_the_next_takes():
    clock = VirtualClock()
    throttle = Throttle(1000, clock=clock, sleep=clock.sleep)
    throttle.take(1000)
    throttle.take(1000)
    assert clock.now == pytest.approx(2 - Throttle.BURST)
    throttle.set_rate(4000)
    assert throttle.rate == 4000
    throttle.take(1000)
    assert clock.now == pytest.approx(2.25 - Throttle.BURST)
    throttle.set_rate(0)
    throttle.take(10**9)
    assert clock.now == pytest.approx(2.25 - Throttle.BURST)


@pytest.mark.parametrize("rate, until", [(1000, 0.3 + 0.1 + 0.95 * 100 / 1000), (0, 0.3 + 0.1)])
def test_a_new_rate_applies_to_a_take_already_waiting(rate, until):
    """A take of 100 bytes at 100 bytes a second waits 0.95 s; at 0.3 s the rate goes up tenfold (or the
    cap goes): the take sees it within THROTTLE_POLL and owes the rest at the new rate (or nothing)."""
    clock = VirtualClock(2)
    throttle = Throttle(100, clock=clock, sleep=clock.sleep)
    returned = []

    def taker():
        try:
            throttle.take(100)
            returned.append(clock())
        finally:
            clock.done()

    def setter():
        try:
            clock.sleep(0.3)
            throttle.set_rate(rate)
        finally:
            clock.done()

    threads = [threading.Thread(target=taker), threading.Thread(target=setter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(returned) == 1 and 0.3 < returned[0] <= until + 1e-9


def test_a_take_told_to_stop_returns_within_a_poll():
    clock = VirtualClock()
    throttle = Throttle(100, clock=clock, sleep=clock.sleep)
    throttle.take(10_000, stop=lambda: clock.now >= 1.0)  # would wait about 100 s
    assert 1.0 <= clock.now <= 1.0 + THROTTLE_POLL + 1e-9
    assert max(clock.sleeps) <= THROTTLE_POLL


@pytest.mark.parametrize("rate", [-1, 1.5, 1e6, "1000", None, True])
def test_a_throttle_refuses_a_rate_that_is_no_whole_number_of_bytes(rate):
    with pytest.raises(ValueError):
        Throttle(rate)
    throttle = Throttle(1000)
    with pytest.raises(ValueError):
        throttle.set_rate(rate)
    assert throttle.rate == 1000


class CountingThrottle(Throttle):
    """A cap whose every take is counted, and granted at once."""

    def __init__(self, rate):
        super().__init__(rate)
        self.taken = []

    def take(self, n, stop=None):
        self.taken.append(n)


class ReadsCounted(WrappedClient):
    """Records the size of every read of every GET's body (moto's: no socket)."""

    def __init__(self, client):
        super().__init__(client)
        self.reads = []

    def wrap(self, body):
        return _Counted(body, self.reads)


class _Counted:
    def __init__(self, body, reads):
        self._body, self._reads = body, reads

    def read(self, amt=None):
        data = self._body.read(amt)
        self._reads.append(len(data))
        return data

    def close(self):
        self._body.close()


@pytest.mark.parametrize("rate, piece", [(200_000, 64 * KIB), (4_000_000, 500_000), (10**9, MIB)])
def test_fill_takes_from_the_throttle_every_byte_it_reads_before_reading_it(s3, rate, piece):
    data = os.urandom(9 * MIB + 123)
    s3.put_object(Bucket="models", Key="x.big", Body=data)
    client = ReadsCounted(s3)
    throttle = CountingThrottle(rate)
    cdn = CdnManager(download_client=client, upload_client=s3, speed_limit=0, throttle=throttle)
    buf = memoryview(bytearray(4 * MIB))
    assert collect(cdn.fill("models", "x.big", cdn.head("models", "x.big"), buf), buf) == data
    assert (
        throttle.taken + [0] == client.reads
    )  # one take for each read, of its size (the last finds the end)
    assert sum(throttle.taken) == len(data) and max(throttle.taken) == piece
    assert len(throttle.taken) == sum(math.ceil(b / piece) for b in (4 * MIB, 4 * MIB, MIB + 123))


def test_fill_takes_every_byte_it_reads_from_a_socket(proxied_cdn):
    data = os.urandom(3 * MIB + 5)
    throttle = CountingThrottle(4_000_000)
    cdn, proxy = proxied_cdn(data, throttle=throttle)
    buf = memoryview(bytearray(2 * MIB))
    assert collect(cdn.fill("models", "x.big", cdn.head("models", "x.big"), buf), buf) == data
    assert sum(throttle.taken) == len(data) and max(throttle.taken) == 500_000
    assert len(gets(proxy)) == 1


def test_fill_without_a_cap_reads_whole_buffers_and_takes_nothing(s3):
    data = os.urandom(9 * MIB + 123)
    s3.put_object(Bucket="models", Key="x.big", Body=data)
    client = ReadsCounted(s3)
    throttle = CountingThrottle(0)
    cdn = CdnManager(download_client=client, upload_client=s3, speed_limit=0, throttle=throttle)
    buf = memoryview(bytearray(4 * MIB))
    assert collect(cdn.fill("models", "x.big", cdn.head("models", "x.big"), buf), buf) == data
    assert throttle.taken == []
    assert client.reads == [4 * MIB, 4 * MIB, MIB + 123, 0]  # the last finds the end


@pytest.mark.parametrize("socket", [True, False])
def test_a_wait_for_the_cap_is_no_slow_link(proxied_cdn, s3, socket):
    """A cap of half the progress rule's limit: each take waits longer than a window, yet the transfer is
    never dropped (with no resumes, a drop would be an UpstreamTimeout)."""
    data = os.urandom(160 * KIB)
    options = dict(speed_limit=256 * KIB, speed_time=0.3, resumes=0, throttle=Throttle(128 * KIB))
    if socket:
        cdn, proxy = proxied_cdn(data, **options)
    else:
        s3.put_object(Bucket="models", Key="x.big", Body=data)
        cdn = CdnManager(download_client=s3, upload_client=s3, **options)
    buf = memoryview(bytearray(160 * KIB))
    assert collect(cdn.fill("models", "x.big", cdn.head("models", "x.big"), buf), buf) == data
    if socket:
        assert len(gets(proxy)) == 1


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


def test_config_from_yaml_hides_secrets():
    cfg = CdnConfig.from_yaml(YAML)
    assert cfg.downloader == ("dk", "ds-secret") and cfg.uploader == ("uk", "us-secret")
    assert "secret" not in repr(cfg)
    with pytest.raises(UpstreamError):
        CdnConfig.from_yaml("host: x\n")
    with pytest.raises(UpstreamError):
        CdnConfig.from_yaml(": : [")


def test_a_ranged_get_answered_with_the_wrong_length_is_refused(s3):
    s3.put_object(Bucket="models", Key="x.big", Body=os.urandom(100_000))

    class WholeObject:  # a CDN that ignores Range and sends the whole object
        def __getattr__(self, name):
            return getattr(s3, name)

        def get_object(self, **kw):
            kw.pop("Range")
            return s3.get_object(**kw)

    cdn = CdnManager(download_client=WholeObject(), upload_client=s3)
    info = cdn.head("models", "x.big")
    with pytest.raises(IntegrityError):
        list(cdn.fill("models", "x.big", info, memoryview(bytearray(cdn.chunk_size)), 1000, 2000))


def test_interrupted_download_resumes_pinned_to_the_etag(tmp_path, s3):
    flaky = FlakyClient(s3, failures=2, after=70_000, ranges=("bytes=0-", "bytes=70000-"))
    store, api, _ = make_store(tmp_path, s3, download_client=flaky)
    data = os.urandom(300_000)
    big = publish(s3, api, data)
    assert load(store) == data
    tail, last = tail_start(len(big), BLOCK), len(big) - 1
    # the object's end first, then the rest from its start, resumed twice where it broke off
    assert sorted(flaky.gets) == sorted(
        [f"bytes={tail}-{last}", f"bytes=0-{tail - 1}", f"bytes=70000-{tail - 1}", f"bytes=140000-{tail - 1}"]
    )


def test_a_body_that_ends_early_is_resumed_not_returned_short(tmp_path, s3):
    flaky = FlakyClient(s3, failures=1, after=1000, end_early=True, ranges="bytes=0-")
    store, api, _ = make_store(tmp_path, s3, download_client=flaky)
    data = os.urandom(100_000)
    big = publish(s3, api, data)
    assert load(store) == data
    tail, last = tail_start(len(big), BLOCK), len(big) - 1
    assert sorted(flaky.gets) == sorted(
        [f"bytes={tail}-{last}", f"bytes=0-{tail - 1}", f"bytes=1000-{tail - 1}"]
    )


def test_a_body_that_keeps_breaking_is_resumed_a_bounded_number_of_times(s3):
    flaky = FlakyClient(s3, failures=100, after=10)
    s3.put_object(Bucket="models", Key="x.big", Body=os.urandom(1000))
    cdn = CdnManager(download_client=flaky, upload_client=s3, resume_backoff=0)
    info = cdn.head("models", "x.big")
    with pytest.raises(UpstreamError, match="kept breaking off") as caught:
        list(cdn.fill("models", "x.big", info, memoryview(bytearray(cdn.chunk_size))))
    # each resume from where the body before broke off, CDN_RESUMES of them; the last break is the cause
    assert flaky.gets == [f"bytes={10 * i}-999" for i in range(1 + CDN_RESUMES)]
    assert isinstance(caught.value.__cause__, ConnectionResetError)


@pytest.fixture
def fake_s3():
    """``fake_s3(route)``: a CdnManager (the real botocore clients) against an ApiServer answering
    ``route``, and the server."""
    servers = []

    def make(route):
        servers.append(ApiServer(route))
        config = CdnConfig(servers[-1].url, ("dk", "ds-secret"), ("uk", "us-secret"))
        return CdnManager(config), servers[-1]

    yield make
    for server in servers:
        server.close()


def test_a_cdn_request_is_retried_by_botocore_alone(fake_s3):
    """botocore's standard mode retries a request that fails, CDN_ATTEMPTS times in all; nothing retries on
    top of it (a GET refused for good, or whose connection drops every time, is not asked again)."""
    answers = iter([(503, b""), (500, b""), (200, b"", {"ETag": '"e1"'})])
    cdn, server = fake_s3(lambda m, p, b, h: next(answers))
    assert cdn.head("models", "x.big").etag == '"e1"'
    assert len(server.calls) == 3

    for answer, error in (((503, b""), "answered 503"), (DROP, "unreachable")):
        cdn, server = fake_s3(lambda m, p, b, h, answer=answer: answer)
        buf = memoryview(bytearray(cdn.chunk_size))
        with pytest.raises(UpstreamError, match=error) as caught:
            list(cdn.fill("models", "x.big", ObjectInfo(1000, '"e1"'), buf))
        assert [c[:2] for c in server.calls] == [("GET", "/models/x.big")] * CDN_ATTEMPTS
        assert caught.value.__cause__ is not None


def test_cdn_uploads_are_not_hashed_for_their_signature(tmp_path, fake_s3):
    """Parts and PUTs go out as UNSIGNED-PAYLOAD: botocore takes no SHA-256 of the body (the manifest's
    digests cover every byte); everything else of the request is still signed."""
    seen = []

    def route(method, path, body, headers):
        seen.append((method, headers.get("x-amz-content-sha256"), len(body)))
        return 200, b"", {"ETag": '"e1"'}

    cdn, server = fake_s3(route)
    staged = tmp_path / "m.bin.big"
    staged.write_bytes(os.urandom(100_000))
    assert cdn.upload_file("models", "m.bin.big", str(staged)) == '"e1"'
    assert ("PUT", "UNSIGNED-PAYLOAD", 100_000) in seen
    assert {content for _, content, _ in seen} == {"UNSIGNED-PAYLOAD"}
    assert "SignedHeaders=" in server.calls[0][2] and "x-amz-content-sha256" in server.calls[0][2]


def test_a_cdn_upload_of_a_staged_file_that_cannot_be_read_is_a_storage_error(tmp_path, s3):
    cdn = CdnManager(download_client=s3, upload_client=s3)
    gone = str(tmp_path / "gone.part")
    with pytest.raises(StorageError):
        cdn.upload_file("models", "m.bin.big", gone)
    with pytest.raises(StorageError):
        cdn.part_upload("models", "m.bin.big", gone).finish(0)
