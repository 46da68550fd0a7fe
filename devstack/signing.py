"""Contract section 9, the publisher's side, written again from the page and not imported from the loader.

A signed manifest is a DSSE envelope over ``M``, the section 7 manifest JSON plus ``"folder"`` and
``"name"``: ``{"payloadType": PAYLOAD_TYPE, "payload": "<Base64 of M>", "signatures": [{"keyid", "sig"}]}``,
each ``sig`` an Ed25519 signature over ``pae(PAYLOAD_TYPE, M)``. The stack signs with this module and the
loader verifies with its own (and the other way round for uploads): two implementations that agree.

    private, public = new_publisher_key(dir)             # PKCS#8 PEM (0600) and its public half
    raw = Publisher(private).sign(manifest, "models", "m.bin")
    manifest = open_envelope(raw, public, "models", "m.bin")  # ValueError on anything wrong

``payload``, ``envelope`` and ``Publisher.signature`` build what an honest publisher never writes (another
name in ``M``, a foreign key, two signatures, a broken envelope), for tests that must see it refused.
"""

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PAYLOAD_TYPE = "application/vnd.azaion.manifest+json"
PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"

# Anything a trust list may be given as: a key, its PEM text, a file of PEM blocks, or several of these.
TrustedKeys = Ed25519PublicKey | bytes | os.PathLike | str | Iterable


def pae(payload_type: str | bytes, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: ``DSSEv1 SP len(type) SP type SP len(body) SP body``."""
    kind = payload_type.encode("utf-8") if isinstance(payload_type, str) else bytes(payload_type)
    body = bytes(payload)
    return b"DSSEv1 " + str(len(kind)).encode() + b" " + kind + b" " + str(len(body)).encode() + b" " + body


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(public_key: Ed25519PublicKey | bytes) -> str:
    """Hex SHA-256 of the raw 32-byte public key (a key object, or those 32 bytes)."""
    raw = public_key if isinstance(public_key, bytes) else raw_public_key(public_key)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(raw).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM block of ``public_key`` (what ``TRUSTED_PUBLISHERS`` files hold)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_trusted(path: os.PathLike | str, keys: Iterable) -> Path:
    """Writes a ``TRUSTED_PUBLISHERS`` file: one PEM block for each key (a public key or a Publisher)."""
    path = Path(path)
    blocks = [public_pem(k.public_key if isinstance(k, Publisher) else k) for k in keys]
    path.write_bytes(b"".join(blocks))
    return path


def load_public_keys(source: TrustedKeys) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of ``source``: a key, PEM bytes (one or more blocks), a path of a file of
    PEM blocks, a Publisher, or an iterable of any of these."""
    if isinstance(source, Ed25519PublicKey):
        return [source]
    if isinstance(source, Publisher):
        return [source.public_key]
    if isinstance(source, os.PathLike | str):
        return load_public_keys(Path(source).read_bytes())
    if isinstance(source, bytes | bytearray):
        keys = []
        for block in bytes(source).split(b"-----END PUBLIC KEY-----")[:-1]:
            key = serialization.load_pem_public_key(block + b"-----END PUBLIC KEY-----\n")
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("a trusted publisher key must be an Ed25519 public key")
            keys.append(key)
        return keys
    return [key for item in source for key in load_public_keys(item)]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Writes ``data`` to a file that must not exist yet, created with ``mode`` (never wider first)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def new_publisher_key(directory: os.PathLike | str) -> tuple[Path, Path]:
    """``(private, public)``: ``directory/publisher.key`` (PKCS#8 PEM, mode 0600) and ``publisher.pub``
    (SubjectPublicKeyInfo PEM). Files that are already there are kept, so every caller shares one key."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            _write_new(private, pem, 0o600)
        except FileExistsError:
            pass  # another process made it first: use theirs
        public.unlink(missing_ok=True)  # a public half left from another key would mislead
    if not public.exists():
        tmp = public.with_name(public.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(public_pem(Publisher(private).public_key))
        os.replace(tmp, public)
    return private, public


def payload(manifest: dict, folder: str, name: str) -> bytes:
    """``M``: the section 7 manifest with ``folder`` and ``name``, as the UTF-8 JSON bytes that are signed."""
    return json.dumps({**manifest, "folder": folder, "name": name}, separators=(",", ":")).encode("utf-8")


def envelope(payload_bytes: bytes, signatures: list[dict], payload_type: str = PAYLOAD_TYPE) -> bytes:
    """An envelope over ``payload_bytes`` with exactly ``signatures`` (``[{"keyid", "sig"}]``, anything)."""
    return json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload_bytes).decode("ascii"),
            "signatures": signatures,
        }
    ).encode("utf-8")


class Publisher:
    """Signs manifests with one Ed25519 private key (a PKCS#8 PEM file, or a key object)."""

    def __init__(self, private_key: Ed25519PrivateKey | os.PathLike | str):
        if isinstance(private_key, os.PathLike | str):
            private_key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValueError("a publisher key must be an Ed25519 private key")
        self._key = private_key
        self.public_key = private_key.public_key()
        self.keyid = keyid(self.public_key)

    @classmethod
    def generate(cls) -> "Publisher":
        """A publisher with a fresh key held only in memory (an attacker's, or an untrusted one)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_pem(self) -> bytes:
        return public_pem(self.public_key)

    def __repr__(self) -> str:
        return f"Publisher(keyid={self.keyid[:16]}…)"

    def signature(self, payload_bytes: bytes, payload_type: str = PAYLOAD_TYPE) -> dict:
        """``{"keyid", "sig"}`` over ``pae(payload_type, payload_bytes)``."""
        sig = self._key.sign(pae(payload_type, payload_bytes))
        return {"keyid": self.keyid, "sig": base64.b64encode(sig).decode("ascii")}

    def sign(self, manifest: dict, folder: str, name: str) -> bytes:
        """The envelope to store as ``name.manifest`` in ``folder``."""
        body = payload(manifest, folder, name)
        return envelope(body, [self.signature(body)])


def is_envelope(raw: bytes) -> bool:
    """Whether ``raw`` is JSON that carries signatures (a signed manifest, well formed or not)."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and "signatures" in document


def _b64(text, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a Base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not Base64") from exc


def _verifies(signature, keys: list[Ed25519PublicKey], message: bytes) -> bool:
    # The keyid is a hint only (DSSE): every trusted key is tried, so a wrong keyid costs only time.
    if not isinstance(signature, dict):
        return False
    try:
        sig = _b64(signature.get("sig"), "sig")
    except ValueError:
        return False
    for key in keys:
        try:
            key.verify(sig, message)
        except InvalidSignature:
            continue
        return True
    return False


def _json_object(raw: bytes, what: str) -> dict:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not JSON") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{what} is not a JSON object")
    return document


def open_envelope(raw: bytes, trusted_public_keys: TrustedKeys, folder: str, name: str) -> dict:
    """``M`` (with its ``folder`` and ``name``) when ``raw`` is an envelope of PAYLOAD_TYPE with a signature
    that verifies under one of ``trusted_public_keys`` and names ``folder``/``name``; ValueError otherwise."""
    document = _json_object(raw, "the envelope")
    if document.get("payloadType") != PAYLOAD_TYPE:
        raise ValueError("the envelope's payloadType is not " + PAYLOAD_TYPE)
    body = _b64(document.get("payload"), "the payload")
    signatures = document.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise ValueError("the envelope carries no signatures")
    keys = load_public_keys(trusted_public_keys)
    message = pae(PAYLOAD_TYPE, body)
    if not any(_verifies(s, keys, message) for s in signatures):
        raise ValueError("no signature verifies under a trusted key")
    # Only now is the payload parsed: the bytes read are the bytes verified.
    manifest = _json_object(body, "the signed payload")
    if manifest.get("folder") != folder or manifest.get("name") != name:
        raise ValueError(f"the signed manifest is for {manifest.get('folder')!r}/{manifest.get('name')!r}")
    return manifest
