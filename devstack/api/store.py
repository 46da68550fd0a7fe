"""The reference Resource API's state: plain files under one directory, so a test can look inside and a
restarted API picks up where it stopped.

    config.json         token TTL, claims style, HS256 secret, admin secret (generated at first start)
    users.json          [{id, email, salt, password_hash, roles, hardware}]
    key_fragment.bin    the key fragment, when one is set
    resources/_root/    the root folder (a leading underscore can never be a valid folder name)
    resources/<folder>/<file>
    compromise/files/<folder>/<file>     what the API serves in place of resources/<folder>/<file>
    compromise/withheld/<folder>/<file>  (empty) the API answers 404 for that file
                                         (both: the root folder as _root; see "compromise" below)
"""

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ROOT_FOLDER = "_root"
DEFAULT_CONFIG = {"token_ttl_seconds": 3600, "claims_style": "long"}


class InvalidName(ValueError):
    pass


def valid_name(name: str) -> bool:
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return NAME.fullmatch(name) is not None


def _hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)


@contextlib.contextmanager
def _writer(path: Path) -> Iterator[BinaryIO]:
    """A file renamed to ``path`` only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy(source: BinaryIO | bytes, out: BinaryIO) -> int:
    if isinstance(source, bytes | bytearray | memoryview):
        out.write(source)
    else:
        shutil.copyfileobj(source, out, 1024 * 1024)
    return out.tell()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Store:
    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir)
        self._lock = threading.RLock()
        (self.data_dir / "resources" / ROOT_FOLDER).mkdir(parents=True, exist_ok=True)
        self._config_path = self.data_dir / "config.json"
        self._users_path = self.data_dir / "users.json"
        self._fragment_path = self.data_dir / "key_fragment.bin"
        if not self._config_path.exists():
            config = dict(
                DEFAULT_CONFIG, jwt_secret=secrets.token_hex(32), admin_secret=secrets.token_urlsafe(24)
            )
            _write_atomically(self._config_path, json.dumps(config, indent=2))
            self._config_path.chmod(0o600)
        if not self._users_path.exists():
            _write_atomically(self._users_path, "[]")

    # --- config ---------------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        with self._lock:
            return json.loads(self._config_path.read_text())

    def update_config(self, **changes) -> dict:
        with self._lock:
            config = self.config
            config.update({k: v for k, v in changes.items() if v is not None})
            _write_atomically(self._config_path, json.dumps(config, indent=2))
            return config

    # --- users ----------------------------------------------------------------------------------

    def _users(self) -> list[dict]:
        return json.loads(self._users_path.read_text())

    def _save_users(self, users: list[dict]) -> None:
        _write_atomically(self._users_path, json.dumps(users, indent=2))

    @staticmethod
    def public(user: dict) -> dict:
        return {k: user[k] for k in ("id", "email", "roles", "hardware")}

    def add_user(self, email: str, password: str, roles: list[str]) -> dict:
        """Adds or replaces the account; a replaced account keeps its id and loses its hardware binding."""
        salt = secrets.token_bytes(16)
        with self._lock:
            users = self._users()
            old = next((u for u in users if u["email"] == email), None)
            user = {
                "id": old["id"] if old else str(uuid.uuid4()),
                "email": email,
                "salt": salt.hex(),
                "password_hash": _hash_password(password, salt).hex(),
                "roles": list(roles),
                "hardware": None,
            }
            users = [u for u in users if u["email"] != email] + [user]
            self._save_users(users)
            return self.public(user)

    def users(self) -> list[dict]:
        with self._lock:
            return [self.public(u) for u in self._users()]

    def find_user(self, email: str | None = None, user_id: str | None = None) -> dict | None:
        with self._lock:
            return next((u for u in self._users() if u["email"] == email or u["id"] == user_id), None)

    @staticmethod
    def password_matches(user: dict, password: str) -> bool:
        candidate = _hash_password(password, bytes.fromhex(user["salt"]))
        return hmac.compare_digest(candidate, bytes.fromhex(user["password_hash"]))

    def bind_hardware(self, user_id: str, hardware: str) -> bool:
        """Binds an unbound account to ``hardware``; False when it is bound to other hardware."""
        with self._lock:
            users = self._users()
            user = next(u for u in users if u["id"] == user_id)
            if user["hardware"] is None:
                user["hardware"] = hardware
                self._save_users(users)
            return user["hardware"] == hardware

    def reset_hardware(self, email: str) -> bool:
        with self._lock:
            users = self._users()
            user = next((u for u in users if u["email"] == email), None)
            if user is None:
                return False
            user["hardware"] = None
            self._save_users(users)
            return True

    # --- resources ------------------------------------------------------------------------------

    def resource_path(self, folder: str | None, name: str) -> Path:
        if (folder is not None and not valid_name(folder)) or not valid_name(name):
            raise InvalidName("folder and file names must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
        return self.data_dir / "resources" / (folder or ROOT_FOLDER) / name

    @contextlib.contextmanager
    def resource_writer(self, folder: str | None, name: str) -> Iterator[BinaryIO]:
        """A file to write the resource into; it is renamed into place only when the block succeeds, so
        a reader never sees half an upload."""
        with _writer(self.resource_path(folder, name)) as out:
            yield out

    def write_resource(self, folder: str | None, name: str, source: BinaryIO | bytes) -> int:
        with self.resource_writer(folder, name) as out:
            return _copy(source, out)

    def delete_resource(self, folder: str | None, name: str) -> bool:
        """False when there was no such file."""
        path = self.resource_path(folder, name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    # --- compromise ----------------------------------------------------------------------------
    # An attacker who controls the API (contract section 9) serves files of their own in place of the real
    # ones, or withholds them. Only what POST /resources/get serves changes: the real files stay, so ending
    # the compromise restores them, and the admin routes keep showing the real ones.

    def _compromise_path(self, kind: str, folder: str | None, name: str) -> Path:
        real = self.resource_path(folder, name)  # validates both names
        return self.data_dir / "compromise" / kind / real.parent.name / real.name

    def served_path(self, folder: str | None, name: str) -> Path | None:
        """The file POST /resources/get serves for ``folder``/``name``: a substitute, the real file, or
        None when it is withheld."""
        substitute = self._compromise_path("files", folder, name)
        if substitute.exists():
            return substitute
        if self._compromise_path("withheld", folder, name).exists():
            return None
        return self.resource_path(folder, name)

    def put_substitute(self, folder: str | None, name: str, source: BinaryIO | bytes) -> int:
        path = self._compromise_path("files", folder, name)
        self._compromise_path("withheld", folder, name).unlink(missing_ok=True)
        with _writer(path) as out:
            return _copy(source, out)

    def withhold(self, folder: str | None, name: str) -> None:
        self._compromise_path("files", folder, name).unlink(missing_ok=True)
        path = self._compromise_path("withheld", folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def compromised(self) -> dict[str, list[str]]:
        """``{"files": [...], "withheld": [...]}``, each ``"<folder>/<name>"`` (the root: ``_root``)."""
        root = self.data_dir / "compromise"
        return {
            kind: sorted(
                f"{p.parent.name}/{p.name}"
                for p in (root / kind).glob("*/*")
                if p.is_file() and not p.name.startswith(".upload-")
            )
            for kind in ("files", "withheld")
        }

    def end_compromise(self) -> None:
        with self._lock:
            shutil.rmtree(self.data_dir / "compromise", ignore_errors=True)

    # --- key fragment ---------------------------------------------------------------------------

    def key_fragment(self) -> bytes | None:
        try:
            return self._fragment_path.read_bytes()
        except FileNotFoundError:
            return None

    def set_key_fragment(self, data: bytes | None) -> None:
        with self._lock:
            if data is None:
                self._fragment_path.unlink(missing_ok=True)
                return
            tmp = self._fragment_path.with_name("key_fragment.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self._fragment_path)
