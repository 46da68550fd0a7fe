# cython: language_level=3, embedsignature=True
"""Key derivation and the blob format of contract section 1.

A blob is ``IV (16 bytes) || AES-256-CBC(key, IV, PKCS#7(plaintext))`` — exactly what
``openssl enc -aes-256-cbc -K <key> -iv <iv>`` writes after the IV. Encryption and decryption are
streams (``Encryptor``/``Decryptor``, ``encrypt_stream``/``decrypt_stream``) so a resource of any size
passes through in bounded memory; ``encrypt``/``decrypt`` are helpers for small payloads. A blob's last
``TAIL`` bytes alone tell its plaintext size (``plaintext_size``); ``tail_start`` is where a reader in blocks
finds them.

Every way decryption can fail raises the one opaque ``DecryptionError``: a caller cannot tell bad
padding from a truncated or misaligned input.
"""

import base64
import hashlib
import hmac
import os

from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_Resize
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from constants import (API_KEY_SUFFIX, HARDWARE_HASH_PREFIX, HARDWARE_HASH_SUFFIX, IV_SIZE, KEY_SIZE,
                       RESOURCE_KEY_STRING)
from errors import DecryptionError

cdef enum:
    BLOCK = 16

# Bytes at the end of a blob that tell its plaintext size: the last cipher block and the block before it,
# which is all CBC needs to decrypt the last block alone (see ``plaintext_size``).
TAIL = IV_SIZE + BLOCK

__all__ = ["DecryptionError", "Encryptor", "Decryptor", "encrypt", "decrypt", "encrypt_stream",
           "decrypt_stream", "plaintext_size", "TAIL", "tail_start", "key_from_string", "hardware_hash",
           "api_key", "resource_key", "archive_key", "data_key"]


# --- keys -----------------------------------------------------------------------------------------

def key_from_string(str s):
    """SHA-256 of the UTF-8 string: a 32-byte AES-256 key."""
    return hashlib.sha256(s.encode("utf-8")).digest()


def hardware_hash(str hardware):
    """Base64(SHA-384("Azaion_" + hardware + "_%$$$)0_")), standard alphabet with padding."""
    digest = hashlib.sha384((HARDWARE_HASH_PREFIX + hardware + HARDWARE_HASH_SUFFIX).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def api_key(str email, str password, str hardware):
    """The key that wraps the small part for one user on one machine."""
    return key_from_string(email + "-" + password + "-" + hardware_hash(hardware) + API_KEY_SUFFIX)


def resource_key():
    """The key every resource blob is encrypted under (compiled in, never configured)."""
    return key_from_string(RESOURCE_KEY_STRING)


def data_key():
    """A fresh key for one sealed upload, from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def archive_key(fragment):
    """The key of the Docker image archive: SHA-256 of the key fragment bytes."""
    return hashlib.sha256(bytes(fragment)).digest()


cdef _check_key(key):
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise ValueError("an AES-256 key is 32 bytes")


# --- streams --------------------------------------------------------------------------------------

cdef class Encryptor:
    """Encrypts a stream of chunks into a blob. ``update`` may return b"" while input is buffered.

    ``iv`` is a test seam for known-answer vectors; leave it out in real use (a random IV).
    """

    cdef object _ctx
    cdef bytes _iv
    cdef bint _iv_sent
    cdef bint _done
    cdef unsigned long long _count

    def __init__(self, key, iv=None):
        _check_key(key)
        if iv is None:
            iv = os.urandom(IV_SIZE)
        elif len(iv) != IV_SIZE:
            raise ValueError("an IV is 16 bytes")
        self._iv = bytes(iv)
        self._ctx = Cipher(algorithms.AES(bytes(key)), modes.CBC(self._iv)).encryptor()
        self._iv_sent = False
        self._done = False
        self._count = 0

    cdef bytes _take_iv(self):
        if self._iv_sent:
            return b""
        self._iv_sent = True
        return self._iv

    def update(self, data):
        if self._done:
            raise ValueError("encryptor already finalized")
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t head = 0 if self._iv_sent else IV_SIZE
        self._count += n
        # ctx.update() zero-fills a scratch buffer and copies it into new bytes: two extra passes per
        # chunk. update_into() an uninitialised bytearray writes each output byte once.
        out = PyByteArray_FromStringAndSize(NULL, head + n + BLOCK)
        view = memoryview(out)
        if head:
            view[:head] = self._take_iv()
        cdef Py_ssize_t got = self._ctx.update_into(data, view[head:])
        view.release()
        PyByteArray_Resize(out, head + got)
        return out

    def finalize(self):
        """The last block(s): PKCS#7 padding of 1..16 bytes, always present."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._done = True
        cdef int pad = BLOCK - <int>(self._count % BLOCK)
        return self._take_iv() + self._ctx.update(bytes((pad,)) * pad) + self._ctx.finalize()


cdef class Decryptor:
    """Decrypts a blob given as chunks of any size.

    The last 16 plaintext bytes are held back until ``finalize`` because only then is it known that they
    carry the padding. ``update`` returns a memoryview over fresh memory (no copy on the hot path).
    """

    cdef object _key
    cdef object _ctx
    cdef bytearray _iv_buf
    cdef bytes _held
    cdef bint _done

    def __init__(self, key):
        _check_key(key)
        self._key = bytes(key)
        self._ctx = None
        self._iv_buf = bytearray()
        self._held = b""
        self._done = False

    def update(self, data):
        if self._done:
            raise DecryptionError()
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t need
        view = memoryview(data)
        if self._ctx is None:
            need = IV_SIZE - len(self._iv_buf)
            self._iv_buf += view[:need]
            if len(self._iv_buf) < IV_SIZE:
                return b""
            self._ctx = Cipher(algorithms.AES(self._key), modes.CBC(bytes(self._iv_buf))).decryptor()
            view = view[need:]
            n = len(view)
        if n == 0:
            return b""
        cdef Py_ssize_t held = len(self._held)
        # Room for the held bytes, the new plaintext, and what the context may flush from its buffer.
        buf = PyByteArray_FromStringAndSize(NULL, held + n + BLOCK)  # only written bytes are returned
        out = memoryview(buf)
        out[:held] = self._held
        cdef Py_ssize_t got = self._ctx.update_into(view, out[held:])
        cdef Py_ssize_t total = held + got
        cdef Py_ssize_t keep = BLOCK if total >= BLOCK else total
        self._held = bytes(out[total - keep:total])
        return out[:total - keep]

    def finalize(self):
        if self._done:
            raise DecryptionError()
        self._done = True
        if self._ctx is None:
            raise DecryptionError()
        try:
            self._ctx.finalize()  # raises when the ciphertext was not a whole number of blocks
        except ValueError:
            raise DecryptionError() from None  # opaque on purpose: one error for every way it fails
        last = self._held
        if len(last) != BLOCK:
            raise DecryptionError()
        cdef int pad = last[BLOCK - 1]
        # Compare the whole padding run at once so a wrong byte anywhere fails the same way.
        if pad < 1 or pad > BLOCK or not hmac.compare_digest(last[BLOCK - pad:], bytes((pad,)) * pad):
            raise DecryptionError()
        return last[:BLOCK - pad]


def encrypt_stream(key, chunks, iv=None):
    """Yield the blob of the plaintext ``chunks`` (an iterable of bytes-like)."""
    enc = Encryptor(key, iv)
    for chunk in chunks:
        out = enc.update(chunk)
        if out:
            yield out
    yield enc.finalize()


def decrypt_stream(key, chunks):
    """Yield the plaintext of the blob ``chunks``; raises DecryptionError at the end if it is bad."""
    dec = Decryptor(key)
    for chunk in chunks:
        out = dec.update(chunk)
        if len(out):
            yield out
    last = dec.finalize()
    if last:
        yield last


def plaintext_size(key, blob_size, tail):
    """The plaintext length of a blob of ``blob_size`` bytes whose last TAIL (32) bytes are ``tail``.

    CBC lets the last block be decrypted alone, with the block before it as its IV: the padding, and
    with it a wrong key or a damaged end, shows without reading the rest of the blob.
    """
    if blob_size < TAIL or blob_size % BLOCK or len(tail) != TAIL:
        raise DecryptionError()
    return blob_size - TAIL + len(decrypt(key, tail))


def tail_start(long long size, long long block_size):
    """Where the tail of a blob (or of its big part) of ``size`` bytes starts when it is read in blocks of
    ``block_size``: at the block that holds its last TAIL bytes."""
    return max(0, size - TAIL) // block_size * block_size


def encrypt(key, data, iv=None):
    """Blob of a small payload held in memory."""
    enc = Encryptor(key, iv)
    return bytes(enc.update(data) + enc.finalize())


def decrypt(key, blob):
    """Plaintext of a small blob held in memory."""
    dec = Decryptor(key)
    return bytes(dec.update(blob)) + dec.finalize()
