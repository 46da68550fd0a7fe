"""upload_form: the upload form parsed as it streams: which store calls it makes, in which order, and its
refusals."""

import asyncio

import pytest

import upload_form
from errors import BadRequest, PayloadTooLarge

BOUNDARY = "b0undary"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


class FakeStore:
    """Records what receive_upload asks of a ModelStore."""

    def __init__(self):
        self.calls = []
        self.written = bytearray()

    def check_upload(self, name, folder=None):
        self.calls.append(("check", name, folder))
        if folder == "bad":
            raise BadRequest("invalid folder")

    def begin_upload(self, name, folder=None):
        self.calls.append(("begin", name, folder))
        return FakeStaged(self)


class FakeStaged:
    def __init__(self, store):
        self.store = store

    def write(self, data):
        self.store.calls.append(("write", len(data)))
        self.store.written += data

    def finish(self, folder):
        self.store.calls.append(("finish", folder))
        return len(self.store.written)

    def abort(self):
        self.store.calls.append(("abort",))


def form(*fields):
    """A multipart body of ``(name, value)`` fields, in that order; bytes values as files."""
    out = b""
    for field, value in fields:
        out += f"--{BOUNDARY}\r\n".encode()
        if isinstance(value, bytes):
            out += f'Content-Disposition: form-data; name="{field}"; filename="m.bin"\r\n'.encode()
            out += b"Content-Type: application/octet-stream\r\n\r\n" + value + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{BOUNDARY}--\r\n".encode()


def receive(store, body, piece=65536, limit=64 * 1024 * 1024, headers=HEADERS, read=None):
    """Run receive_upload over ``body`` arriving ``piece`` bytes at a time (their sizes added to ``read``)."""
    read = [] if read is None else read

    async def chunks():
        for i in range(0, len(body), piece):
            read.append(len(body[i : i + piece]))
            yield body[i : i + piece]

    async def run():
        return await upload_form.receive_upload(store, "m.bin", headers, chunks(), limit)

    return asyncio.run(run())


DATA = bytes(range(256)) * (3 * upload_form.BATCH // 256 + 17)  # three batches and a bit


@pytest.mark.parametrize("piece", [1000, 65536, 5 * 1024 * 1024])
def test_folder_first_begins_with_the_folder_and_writes_in_batches(piece):
    store = FakeStore()
    size = receive(store, form(("folder", "models"), ("data", DATA)), piece)
    assert size == len(DATA) and bytes(store.written) == DATA
    assert store.calls[:3] == [
        ("check", "m.bin", None),
        ("check", "m.bin", "models"),
        ("begin", "m.bin", "models"),
    ]
    writes = [c[1] for c in store.calls if c[0] == "write"]
    assert all(n >= upload_form.BATCH for n in writes[:-1]) and sum(writes) == len(DATA)
    assert store.calls[-1] == ("finish", "models")


def test_data_first_begins_without_a_folder_and_finishes_in_the_folder_named_last():
    store = FakeStore()
    size = receive(store, form(("data", DATA), ("folder", " models ")))
    assert size == len(DATA) and bytes(store.written) == DATA
    assert ("begin", "m.bin", None) in store.calls
    assert store.calls[-1] == ("finish", "models")


def test_an_empty_file_is_staged_and_finished():
    store = FakeStore()
    assert receive(store, form(("folder", "models"), ("data", b""))) == 0
    assert store.calls[-2:] == [("begin", "m.bin", "models"), ("finish", "models")]


@pytest.mark.parametrize(
    "body,message",
    [
        (form(("folder", "models")), "no file field 'data'"),
        (form(("data", b"abc")), "no field 'folder'"),
    ],
)
def test_a_missing_field_is_400_and_aborts_what_was_staged(body, message):
    store = FakeStore()
    with pytest.raises(BadRequest, match=message):
        receive(store, body)
    began = any(c[0] == "begin" for c in store.calls)
    assert began == (("abort",) in store.calls)
    assert not [c for c in store.calls if c[0] == "finish"]


def test_a_body_that_is_not_multipart_is_400_before_anything():
    store = FakeStore()
    with pytest.raises(BadRequest, match="multipart/form-data"):
        receive(store, b"raw", headers={"content-type": "application/octet-stream"})
    assert store.calls == []


def test_a_bad_folder_sent_first_is_refused_before_the_file_is_staged():
    store = FakeStore()
    with pytest.raises(BadRequest, match="invalid folder"):
        receive(store, form(("folder", "bad"), ("data", DATA)))
    assert not [c for c in store.calls if c[0] in ("begin", "write")]


def test_an_announced_length_over_the_limit_is_413_unread():
    store, read = FakeStore(), []
    big = {**HEADERS, "content-length": str(1000 + upload_form.FRAMING + 1)}
    with pytest.raises(PayloadTooLarge):
        receive(store, form(("folder", "models"), ("data", DATA)), headers=big, limit=1000, read=read)
    assert store.calls == [] and read == []


@pytest.mark.parametrize("field", ["data", "other"])
def test_a_body_over_the_limit_is_413_after_at_most_the_limit(field):
    # Also a field of another name: a chunked body announces no length, so every byte counts.
    store, read = FakeStore(), []
    limit = 2 * upload_form.BATCH
    with pytest.raises(PayloadTooLarge, match=f"maximum of {limit} bytes"):
        receive(store, form(("folder", "models"), (field, DATA)), limit=limit, read=read)
    assert limit < sum(read) <= limit + upload_form.FRAMING + 65536
    assert not [c for c in store.calls if c[0] == "finish"]
    assert (("abort",) in store.calls) == (field == "data")  # what was staged goes


@pytest.mark.parametrize("piece", [7, 65536, 5 * 1024 * 1024])
@pytest.mark.parametrize(
    "fields,message",
    [
        ((("folder", "models"), ("folder", "evil-bucket"), ("data", DATA)), "more than one 'folder' field"),
        ((("data", DATA), ("folder", "models"), ("folder", "evil-bucket")), "more than one 'folder' field"),
        ((("folder", "models"), ("data", DATA), ("data", b"evil")), "more than one file field 'data'"),
        ((("data", DATA), ("data", b"evil"), ("folder", "models")), "more than one file field 'data'"),
    ],
    ids=["folder-twice-first", "folder-twice-last", "data-twice-folder-first", "data-twice-folder-last"],
)
def test_a_repeated_field_is_400_before_anything_is_published(fields, message, piece):
    """Two 'folder' fields were joined ('models' + 'evil-bucket': the bucket 'modelsevil-bucket'), two 'data'
    parts into one model, and published with 200. Either is a 400 now: nothing is finished (published), and
    what was staged is aborted."""
    store = FakeStore()
    with pytest.raises(BadRequest, match=message):
        receive(store, form(*fields), piece)
    assert not [c for c in store.calls if c[0] == "finish"]
    assert not [c for c in store.calls if "modelsevil-bucket" in c or "models evil-bucket" in c]
    began = any(c[0] == "begin" for c in store.calls)
    assert began == (("abort",) in store.calls)
    assert bytes(store.written) == DATA[: len(store.written)]  # never a byte of the second part
