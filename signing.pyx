# cython: language_level=3, embedsignature=True
"""Publisher signatures over manifests (contract section 9): the API may withhold a model, never substitute
one.

The Resource API anchors the manifest, and it also hands out ``cdn.yaml``: whoever controls it could point a
device at a model of their own. A publisher the device trusts signs each manifest (with its ``folder`` and
``name``, so a signature cannot be moved to another resource) in a DSSE envelope, the one in-toto and
Sigstore use, and the device pins the publishers' Ed25519 public keys (``TRUSTED_PUBLISHERS``).

DSSE signs the exact payload bytes together with their type (``pae``), never JSON parsed and written again:
the bytes verified are the bytes parsed. ``Publisher`` signs at upload (``PUBLISHER_KEY_FILE``); ``Trust``
decides at load, before a byte of the model is fetched or served.
"""

import base64
import binascii
import hashlib
import json
import logging
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from errors import IntegrityError
from logs import printable

log = logging.getLogger("loader.signing")

PAYLOAD_TYPE = "application/vnd.azaion.manifest+json"
# An envelope names each signature's key; a publisher rotating keys signs with two at most. More than this
# many is no envelope a publisher wrote, and would only cost verifications.
MAX_SIGNATURES = 16
MAX_KEY_FILE_BYTES = 1024 * 1024
ED25519_SIGNATURE_SIZE = 64
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)
_HEX_KEYID = re.compile(r"[0-9a-f]{64}")


class SignatureError(IntegrityError):
    """A manifest no trusted publisher vouches for: a 502, and nothing of the model is fetched or served."""


def pae(payload_type, payload):
    """DSSE's pre-authentication encoding: ``"DSSEv1" SP len(type) SP type SP len(body) SP body``, what a
    signature covers (the type too, so a signature over another kind of document never verifies here)."""
    kind = payload_type.encode("utf-8") if isinstance(payload_type, str) else bytes(payload_type)
    body = bytes(payload)
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def keyid(public_key):
    """The name of a publisher's key in an envelope: the hex SHA-256 of its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{what} {path!r} is larger than {MAX_KEY_FILE_BYTES} bytes: no key file")
    return data


class Publisher:
    """Signs the manifests of uploads with one Ed25519 private key."""

    def __init__(self, private_key):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ValueError("a publisher key must be an Ed25519 private key")
        self._key = private_key
        self.keyid = keyid(private_key.public_key())

    @classmethod
    def from_file(cls, path):
        """The key in a PEM PKCS#8 file (``openssl genpkey -algorithm ed25519``); ValueError naming the file,
        never its content, when it is no unencrypted Ed25519 private key."""
        data = _read_key_file(path, "PUBLISHER_KEY_FILE")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"PUBLISHER_KEY_FILE {path!r} holds no unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"PUBLISHER_KEY_FILE {path!r} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def sign(self, document, folder, name):
        """The envelope (UTF-8 JSON bytes) over the manifest ``document`` (a dict) bound to ``folder`` and
        ``name``."""
        payload = json.dumps({**document, "folder": folder, "name": name}).encode("utf-8")
        signature = self._key.sign(pae(PAYLOAD_TYPE, payload))
        return json.dumps({
            "payloadType": PAYLOAD_TYPE,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [{"keyid": self.keyid, "sig": base64.b64encode(signature).decode("ascii")}],
        }).encode("utf-8")


def is_envelope(document):
    """Whether a manifest document, as parsed, is a DSSE envelope rather than a plain manifest."""
    return isinstance(document, dict) and "payloadType" in document


class Trust:
    """The device's publishers: their public keys by keyid, and whether an unsigned manifest is refused.
    Counts what it saw for /metrics."""

    def __init__(self, public_keys=(), require=False):
        self.keys = {}
        for key in public_keys:
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("a trusted publisher key must be an Ed25519 public key")
            self.keys[keyid(key)] = key
        self.require = bool(require)
        self.unsigned_loads = 0
        self.signed_loads = 0
        self.refusals = 0

    def stats(self):
        """What the publishers' check saw, for /metrics (counts since start)::

            {"unsigned_manifest_loads": int,  # loads and prefetches of a manifest no publisher signed
             "signed_manifest_loads": int,    # ... of one a trusted publisher's signature verified
             "signature_refusals": int}       # ... refused: no trusted publisher signed it
        """
        return {"unsigned_manifest_loads": self.unsigned_loads, "signed_manifest_loads": self.signed_loads,
                "signature_refusals": self.refusals}

    @classmethod
    def from_file(cls, path, require=False):
        """The keys of ``TRUSTED_PUBLISHERS``: one or more PEM public keys in one file (several while a
        publisher rotates); an empty ``path`` trusts no one."""
        if not path:
            return cls((), require)
        data = _read_key_file(path, "TRUSTED_PUBLISHERS")
        keys = []
        for number, block in enumerate(_PEM_PUBLIC.findall(data), 1):
            try:
                key = serialization.load_pem_public_key(block)
            except (ValueError, TypeError):
                raise ValueError(
                    f"TRUSTED_PUBLISHERS {path!r}: public key {number} is not valid PEM"
                ) from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError(f"TRUSTED_PUBLISHERS {path!r}: public key {number} is a "
                                 f"{type(key).__name__}, not an Ed25519 key")
            keys.append(key)
        if not keys:
            raise ValueError(
                f"TRUSTED_PUBLISHERS {path!r} holds no PEM public key (-----BEGIN PUBLIC KEY-----)"
            )
        return cls(keys, require)

    def open(self, envelope, folder, name, what, parse):
        """The manifest document of a signed manifest: its payload, once a trusted publisher's signature over
        it verifies, parsed by ``parse`` (bytes -> dict), and signed for ``folder`` and ``name``;
        SignatureError otherwise."""
        try:
            document = parse(self._verified(envelope, what))
            if document.get("folder") != folder or document.get("name") != name:
                # A signed manifest names the resource it was signed for: one copied to another name is
                # refused.
                raise SignatureError(
                    f"the manifest of {what} is not signed by a trusted publisher for it: it was signed for "
                    f"{_shown(document.get('folder'))}/{_shown(document.get('name'))}")
        except SignatureError:
            self.refusals += 1
            raise
        self.signed_loads += 1
        return document

    def _verified(self, envelope, what):
        def refused(reason):
            return SignatureError(f"the manifest of {what} is not signed by a trusted publisher: {reason}")

        if envelope.get("payloadType") != PAYLOAD_TYPE:
            raise refused(f"its envelope's payloadType is not {PAYLOAD_TYPE}")
        payload = _base64(envelope.get("payload"))
        if payload is None:
            raise refused("its envelope's payload is not Base64")
        signatures = envelope.get("signatures")
        if not isinstance(signatures, list) or not signatures:
            raise refused("its envelope carries no signatures")
        if len(signatures) > MAX_SIGNATURES:
            raise refused(f"its envelope carries more than {MAX_SIGNATURES} signatures")
        if not self.keys:
            raise refused("this device trusts no publisher (TRUSTED_PUBLISHERS is not set)")
        message = pae(PAYLOAD_TYPE, payload)
        for entry in signatures:
            if not isinstance(entry, dict):
                raise refused("a signature of its envelope is not an object")
            sig = _base64(entry.get("sig"))
            if sig is None or len(sig) != ED25519_SIGNATURE_SIZE:
                continue
            for key in self._candidates(entry.get("keyid")):
                try:
                    key.verify(sig, message)
                    return payload
                except InvalidSignature:
                    pass
        raise refused("no signature verifies under a key in TRUSTED_PUBLISHERS")

    def _candidates(self, named):
        """The trusted keys a signature may be by: the one its keyid names, or each when it names none."""
        if isinstance(named, str) and _HEX_KEYID.fullmatch(named):
            key = self.keys.get(named)
            return () if key is None else (key,)
        if named in (None, ""):
            return tuple(self.keys.values())
        return ()

    def unsigned(self, what, kind="its manifest is not signed"):
        """An unsigned manifest (or format 1): refused under REQUIRE_SIGNATURE, else loaded with a warning."""
        if self.require:
            self.refusals += 1
            raise SignatureError(f"{what} is not signed by a trusted publisher ({kind}), and "
                                 "REQUIRE_SIGNATURE refuses that")
        self.unsigned_loads += 1
        log.warning("%s: %s by a publisher; loading it because REQUIRE_SIGNATURE is off", what, kind)


def _base64(value):
    """Bytes of standard or URL-safe Base64 text (DSSE allows either), or None."""
    if not isinstance(value, str):
        return None
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _shown(value):
    """A value from a peer, fit for a message: short, printable."""
    text = value if isinstance(value, str) else repr(value)
    return printable(text[:80]) or "''"
