# cython: language_level=3, embedsignature=True
"""An upload's multipart/form-data body, parsed as it streams in and handed to a staged upload
(``ModelStore.begin_upload``), so the plaintext never lands on disk or whole in memory. The form has a file
field ``data`` and a text field ``folder``, each once (a second is a 400, before anything is published);
with the folder first, the big part goes to the CDN while the file still arrives."""

import asyncio

from anyio.to_thread import run_sync
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from errors import BadRequest, PayloadTooLarge

# Plaintext handed to the staged upload at a time.
BATCH = 1024 * 1024
# Room over the file's limit for the multipart framing and the folder field.
FRAMING = 64 * 1024
# The most of the folder field that is kept (a folder name has at most 63 characters).
MAX_FIELD = 1024


async def receive_upload(store, name, headers, body, limit):
    """Stage the form's file ``data`` as ``name`` and publish it in ``folder``; returns its plaintext size.

    ``store`` is a ModelStore, ``headers`` the request's (lower-case names), ``body`` its chunks as they
    arrive, ``limit`` the largest file taken. The blocking store calls run on worker threads."""
    kind, params = parse_options_header(headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise BadRequest("upload must be multipart/form-data with a file field 'data' and a field 'folder'")
    most = limit + FRAMING
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > most:
        raise PayloadTooLarge(f"the upload is larger than the configured maximum of {limit} bytes")
    await run_sync(store.check_upload, name)  # 400/401/403 before the body is read

    form = _FormState()
    parser = MultipartParser(params[b"boundary"], form.callbacks())
    staged = None
    folder_checked = False
    received = 0
    # One batch is encrypted, hashed and written on a worker thread while the next is received and
    # parsed here: in turn, the two took a 1 GiB upload about a second longer.
    writing = None

    async def write(data):
        nonlocal writing
        if writing is not None:
            await writing
        writing = asyncio.ensure_future(run_sync(staged.write, data))

    try:
        async for chunk in body:
            # Every byte counts, not only the file's: a chunked body announces no length, and a huge
            # field of another name would otherwise be read to its end.
            received += len(chunk)
            if received > most:
                raise PayloadTooLarge(f"the upload is larger than the configured maximum of {limit} bytes")
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise BadRequest("the upload is not valid multipart/form-data") from exc
            if form.error is not None:
                raise BadRequest(form.error)
            if form.folder_done and staged is None and not folder_checked:  # refused before the file
                await run_sync(store.check_upload, name, form.folder)
                folder_checked = True
            if form.pending and (len(form.pending) >= BATCH or form.data_done):
                if staged is None:  # the folder, when it came first, lets the CDN upload overlap this
                    folder = form.folder if form.folder_done else None
                    staged = await run_sync(store.begin_upload, name, folder)
                data, form.pending = bytes(form.pending), bytearray()
                await write(data)
        try:
            parser.finalize()
        except FormParserError as exc:
            raise BadRequest("the upload is not valid multipart/form-data") from exc
        if form.error is not None:
            raise BadRequest(form.error)
        if not form.data_seen:
            raise BadRequest("the upload has no file field 'data'")
        if form.folder is None:
            raise BadRequest("the upload has no field 'folder'")
        if staged is None:
            staged = await run_sync(store.begin_upload, name, form.folder)
        if form.pending:
            await write(bytes(form.pending))
        if writing is not None:
            await writing
        return await run_sync(staged.finish, form.folder)
    except BaseException:
        if writing is not None:
            await asyncio.wait([writing])  # the worker must be done with the file before it goes
        if staged is not None:
            staged.abort()
        raise


class _FormState:
    """Collects the multipart events: the bytes of field 'data' and the text of field 'folder'. A second
    part of either name is never joined to the first: it sets ``error``, and its bytes are dropped."""

    def __init__(self):
        self.pending = bytearray()
        self.folder = None
        self.error = None
        self.folder_seen = self.folder_done = self.data_seen = self.data_done = False
        self._field = self._header = b""
        self._value = b""
        self._name = None
        self._text = bytearray()

    def callbacks(self):
        def on_header_field(data, start, end):
            self._field += data[start:end]

        def on_header_value(data, start, end):
            self._value += data[start:end]

        def on_header_end():
            if self._field.lower() == b"content-disposition":
                self._header = self._value
            self._field = self._value = b""

        def on_headers_finished():
            _, params = parse_options_header(self._header)
            self._name = params.get(b"name")
            self._header = b""
            if self._name == b"data":
                if self.data_seen:
                    self.error = self.error or "the upload has more than one file field 'data'"
                    self._name = None  # its bytes are not the model's
                self.data_seen = True
            elif self._name == b"folder":
                if self.folder_seen:
                    self.error = self.error or "the upload has more than one 'folder' field"
                    self._name = None
                self.folder_seen = True

        def on_part_data(data, start, end):
            if self._name == b"data":
                self.pending += data[start:end]
            elif self._name == b"folder" and len(self._text) < MAX_FIELD:
                self._text += data[start:end]

        def on_part_end():
            if self._name == b"folder":
                self.folder = self._text.decode("utf-8", "replace").strip()
                self.folder_done = True
            elif self._name == b"data":
                self.data_done = True
            self._name = None

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        }
