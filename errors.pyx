# cython: language_level=3, embedsignature=True
"""The loader's one exception hierarchy.

Every module raises these and nothing else; lower-layer exceptions (requests, botocore, docker,
OSError, cryptography) are converted where they are caught, with ``raise X(...) from exc``.
``main.py`` maps each class to an HTTP status in one table.

    LoaderError
    ├── BadRequest            a name or body the contract refuses
    ├── PayloadTooLarge       a body beyond the configured maximum
    ├── AuthError             bad credentials, or the Resource API refused the token
    │   └── NotLoggedIn       a call that needs a session before /login
    ├── Forbidden             the user's role may not do this
    ├── NotFound              no such resource
    ├── HardwareMismatch      the account is bound to other hardware
    ├── UpstreamError         the Resource API or the CDN failed or could not be reached
    │   └── UpstreamTimeout   ... within the configured timeout
    ├── IntegrityError        bytes that should be whole are not (cache digest, truncated body)
    │   └── DecryptionError   a blob failed to decrypt (opaque: no padding oracle)
    ├── StorageError          the local disk refused a write (full, read-only)
    └── EngineError           the Docker Engine failed or could not be reached

Messages are for humans and never contain a credential, token, key or secret.
"""


class LoaderError(Exception):
    """Base of every error the loader raises on purpose."""

    def __init__(self, detail="loader error"):
        super().__init__(detail)
        self.detail = detail


class BadRequest(LoaderError):
    pass


class PayloadTooLarge(LoaderError):
    pass


class AuthError(LoaderError):
    pass


class NotLoggedIn(AuthError):
    def __init__(self, detail="not logged in: POST /login first"):
        super().__init__(detail)


class Forbidden(LoaderError):
    pass


class NotFound(LoaderError):
    pass


class HardwareMismatch(LoaderError):
    pass


class UpstreamError(LoaderError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class IntegrityError(LoaderError):
    pass


class DecryptionError(IntegrityError):
    def __init__(self, detail="decryption failed: wrong key or corrupt data"):
        super().__init__(detail)


class StorageError(LoaderError):
    pass


class EngineError(LoaderError):
    pass


def storage_error(exc, what):
    """The StorageError for an OSError of the local disk while it held ``what``, with ``exc`` as its cause
    (also where it is handed on rather than raised)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        error = StorageError(f"the model cache has no room for {what}")
    else:
        error = StorageError(f"the model cache failed on {what} ({errno.errorcode.get(exc.errno, 'error')})")
    error.__cause__ = exc
    return error
