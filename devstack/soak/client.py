"""The soak's client side (devstack.soak): the models' plaintexts, and the loader's routes called the way
an on-device app would, every answer an ``Answer`` (rules), never an exception; and the size of a
model's big part, which the cache budget and /downloads speak in.

Bodies stream both ways: a load is hashed as it arrives, an upload is generated as it is sent, so a
256 MiB model is never held whole. ``StalledLoad`` is the one client that misbehaves on purpose: it reads a
load's head and then nothing."""

import hashlib
import json
import socket
import uuid
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from devstack.crypto import encrypted_size
from devstack.soak.rules import Answer
from devstack.split import MANIFEST_BLOCK_SIZE, small_size

KiB, MiB = 1024, 1024 * 1024
CHUNK = MiB
FOLDER = "soak"  # the folder (and CDN bucket) of the soak's models
BLOCK = MANIFEST_BLOCK_SIZE  # a sealed big part's blocks: what a download verifies, records and resumes


def big_size(size: int) -> int:
    """Bytes of the big part of a model of ``size`` plaintext bytes (contract section 2: the blob less its
    small part), the same for every version of it."""
    blob = encrypted_size(size)
    return blob - small_size(blob)


def content(seed: int, index: int, version: int, size: int):
    """The plaintext of a version of model ``index``, as 1 MiB chunks: an AES-CTR keystream, so it is
    random-looking, cheap, and the same for the same seed."""
    key = hashlib.sha256(f"soak/{seed}/{index}/{version}".encode()).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(CHUNK)
    left = size
    while left:
        n = min(CHUNK, left)
        yield stream.update(zeros[:n])
        left -= n


def digest_of(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _detail(r: requests.Response) -> tuple[str | None, object]:
    try:
        body = r.json()
    except ValueError:
        return (r.text[:200] or None), None
    return (body.get("detail") if isinstance(body, dict) else None), body


class Client:
    """The loader at ``url``. A fresh connection for every request: after an operation nothing of the
    client's stays open in the loader, so its descriptors can be counted at rest."""

    def __init__(self, url: str, read_timeout: float):
        self.url = url
        self.timeout = (5, read_timeout)

    def call(self, method: str, path: str, **kw) -> Answer:
        try:
            r = requests.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            return Answer(error=type(exc).__name__)
        if not r.headers.get("content-type", "").startswith("application/json"):
            return Answer(status=r.status_code, json=r.text)
        detail, body = _detail(r)
        return Answer(status=r.status_code, detail=detail, json=body)

    def load(self, name: str) -> Answer:
        """A /load read to its end (or its break), hashed as it arrives."""
        try:
            r = requests.post(
                f"{self.url}/load/{name}", json={"folder": FOLDER}, stream=True, timeout=self.timeout
            )
        except requests.RequestException as exc:
            return Answer(error=type(exc).__name__)
        with r:
            if r.status_code != 200:
                detail, body = _detail(r)
                return Answer(status=r.status_code, detail=detail, json=body)
            a = Answer(status=200, length=int(r.headers.get("content-length", -1)))
            h = hashlib.sha256()
            try:
                for chunk in r.iter_content(CHUNK):
                    h.update(chunk)
                    a.got += len(chunk)
            except requests.RequestException as exc:
                a.error = type(exc).__name__
            a.digest = h.hexdigest()
            return a

    def prefetch(self, name: str) -> Answer:
        return self.call("POST", f"/prefetch/{name}", json={"folder": FOLDER})

    def downloads(self) -> Answer:
        return self.call("GET", "/downloads")

    def upload(self, name: str, chunks) -> Answer:
        """A multipart upload streamed from ``chunks`` (chunked: no length announced), the folder first."""
        boundary = uuid.uuid4().hex

        def body():
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n{FOLDER}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            yield from chunks
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.call("POST", f"/upload/{name}", data=body(), headers=headers)

    def stalled_load(self, name: str) -> "StalledLoad":
        return StalledLoad(self.url, name, self.timeout[1])


class StalledLoad:
    """A /load whose client reads the answer's head and then nothing, as an app that stopped reading: a raw
    socket with a small receive buffer, so the loader soon finds its sends waiting. ``close`` when done."""

    RECEIVE_BUFFER = 16 * KiB

    def __init__(self, url: str, name: str, timeout: float):
        self.error: str | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RECEIVE_BUFFER)  # before connect
        self.sock.settimeout(timeout)
        where = urlsplit(url)
        body = json.dumps({"folder": FOLDER}).encode()
        request = (
            f"POST /load/{name} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        try:
            self.sock.connect((where.hostname, where.port))
            self.sock.sendall(request)
        except OSError as exc:
            self.error = type(exc).__name__

    def head(self) -> Answer:
        """The answer's status and Content-Length (an error's JSON detail too); of a 200 nothing more is
        read."""
        if self.error is not None:
            return Answer(error=self.error)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return Answer(error="closed before the head")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            headers = {k.strip().lower(): v.strip() for k, v in fields.items()}
            length = int(headers.get("content-length", -1))
            if status == 200:
                return Answer(status=200, length=length, got=len(rest))
            while len(rest) < length:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
        except (OSError, ValueError, IndexError) as exc:
            return Answer(error=type(exc).__name__)
        try:
            body = json.loads(rest)
        except ValueError:
            return Answer(status=status, detail=rest[:200].decode("latin-1") or None)
        return Answer(status=status, detail=body.get("detail") if isinstance(body, dict) else None, json=body)

    def close(self) -> None:
        self.sock.close()
