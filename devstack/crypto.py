"""Contract section 1, written again from the page and not imported from the loader.

The dev stack encrypts with this module and the loader decrypts with its own: a second, independent
implementation is what makes the stack a cross-check rather than an echo.
"""

import base64
import hashlib
import os
from collections.abc import Iterable, Iterator

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

RESOURCE_KEY_STRING = "azaion-loader/resource-key/v1"
IV_SIZE = 16
BLOCK = 16


class DecryptionError(Exception):
    """The input is not a blob under this key (bad length, bad padding, or garbage)."""


def key_from_string(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8")).digest()


def hardware_hash(hardware: str) -> str:
    digest = hashlib.sha384(("Azaion_" + hardware + "_%$$$)0_").encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def api_key_string(email: str, password: str, hardware: str) -> str:
    """``hardware`` is the raw hardware line; it is hashed here as the contract says."""
    return email + "-" + password + "-" + hardware_hash(hardware) + "-#%@AzaionKey@%#---"


def api_key(email: str, password: str, hardware: str) -> bytes:
    return key_from_string(api_key_string(email, password, hardware))


def resource_key() -> bytes:
    return key_from_string(RESOURCE_KEY_STRING)


def archive_key(fragment: bytes) -> bytes:
    return hashlib.sha256(fragment).digest()


def encrypted_size(plain_size: int) -> int:
    """PKCS#7 always adds 1..16 bytes, so the size is known before a single byte is encrypted."""
    return IV_SIZE + (plain_size // BLOCK + 1) * BLOCK


def encrypt_stream(key: bytes, chunks: Iterable[bytes], iv: bytes | None = None) -> Iterator[bytes]:
    """Yields the IV, then the ciphertext as the plaintext chunks arrive. ``iv`` is a test seam."""
    iv = os.urandom(IV_SIZE) if iv is None else iv
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(BLOCK * 8).padder()
    yield iv
    for chunk in chunks:
        out = encryptor.update(padder.update(chunk))
        if out:
            yield out
    yield encryptor.update(padder.finalize()) + encryptor.finalize()


def encrypt(key: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
    return b"".join(encrypt_stream(key, [plaintext], iv))


def decrypt(key: bytes, blob: bytes) -> bytes:
    if len(blob) < IV_SIZE + BLOCK or len(blob) % BLOCK:
        raise DecryptionError("not a blob")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(blob[:IV_SIZE])).decryptor()
    unpadder = padding.PKCS7(BLOCK * 8).unpadder()
    try:
        return unpadder.update(decryptor.update(blob[IV_SIZE:]) + decryptor.finalize()) + unpadder.finalize()
    except ValueError as exc:
        raise DecryptionError("not a blob") from exc


def file_chunks(path: os.PathLike | str, size: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
