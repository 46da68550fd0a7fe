"""A client for the reference API's ``/_devstack/`` endpoints, used by the stack, the seed step and tests."""

import os
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import requests


class AdminClient:
    def __init__(self, base_url: str, secret: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()
        self._http.trust_env = False  # loopback only: never through a proxy from the environment
        self._http.headers["X-Devstack-Admin"] = secret

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self._http.request(
            method, f"{self.base_url}/_devstack{path}", timeout=self.timeout, **kwargs
        )
        response.raise_for_status()
        return response

    def healthy(self) -> bool:
        try:
            return self._http.get(f"{self.base_url}/_devstack/health", timeout=1).ok
        except requests.RequestException:
            return False

    # --- users and settings ---------------------------------------------------------------------

    def add_user(self, email: str, password: str, roles: list[str] | tuple[str, ...]) -> dict:
        """Adds or replaces an account (a replaced one loses its hardware binding)."""
        return self._call(
            "POST", "/users", json={"email": email, "password": password, "roles": list(roles)}
        ).json()

    def users(self) -> list[dict]:
        return self._call("GET", "/users").json()

    def reset_hardware(self, email: str) -> None:
        self._call("DELETE", f"/users/{quote(email, safe='@')}/hardware")

    def set_config(self, token_ttl_seconds: float | None = None, claims_style: str | None = None) -> dict:
        body = {"token_ttl_seconds": token_ttl_seconds, "claims_style": claims_style}
        return self._call("PATCH", "/config", json=body).json()

    # --- stored files and the key fragment ------------------------------------------------------

    @staticmethod
    def _file_path(folder: str | None, name: str) -> str:
        return f"/files/{folder}/{name}" if folder else f"/files/{name}"

    def put_file(self, folder: str | None, name: str, data: bytes | BinaryIO | os.PathLike | str) -> dict:
        """Stores ``data`` as is (no encryption) under ``folder`` (``None``: the root folder)."""
        if isinstance(data, os.PathLike | str):
            with open(Path(data), "rb") as f:
                return self._call("PUT", self._file_path(folder, name), data=f).json()
        return self._call("PUT", self._file_path(folder, name), data=data).json()

    def get_file(self, folder: str | None, name: str) -> bytes | None:
        try:
            return self._call("GET", self._file_path(folder, name)).content
        except requests.HTTPError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    def delete_file(self, folder: str | None, name: str) -> bool:
        """Removes a stored file; False when there was none."""
        try:
            self._call("DELETE", self._file_path(folder, name))
        except requests.HTTPError as exc:
            if exc.response.status_code == 404:
                return False
            raise
        return True

    def set_key_fragment(self, fragment: bytes | None) -> None:
        if fragment is None:
            self._call("DELETE", "/key-fragment")
        else:
            self._call("PUT", "/key-fragment", data=fragment)

    def key_fragment(self) -> bytes | None:
        try:
            return self._call("GET", "/key-fragment").content
        except requests.HTTPError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    # --- compromise (an attacker who controls the API) -----------------------------------------------

    def put_substitute(self, folder: str | None, name: str, data: bytes) -> dict:
        """``POST /resources/get`` serves ``data`` for ``folder``/``name`` instead of the stored file."""
        return self._call("PUT", "/compromise" + self._file_path(folder, name), data=data).json()

    def withhold(self, folder: str | None, name: str) -> None:
        """``POST /resources/get`` answers 404 for ``folder``/``name`` (the stored file stays)."""
        path = f"/compromise/withheld/{folder}/{name}" if folder else f"/compromise/withheld/{name}"
        self._call("PUT", path)

    def compromised(self) -> dict[str, list[str]]:
        """``{"files": ["<folder>/<name>", ...], "withheld": [...]}`` (the root folder is ``_root``)."""
        return self._call("GET", "/compromise").json()

    def end_compromise(self) -> None:
        self._call("DELETE", "/compromise")

    # --- counters and faults --------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return self._call("GET", "/counters").json()

    def reset_counters(self) -> None:
        self._call("DELETE", "/counters")

    def set_fault(
        self,
        route: str,
        *,
        status: int | None = None,
        delay: float = 0.0,
        garbage: str | None = None,
        count: int | None = 1,
    ) -> None:
        """The next ``count`` calls matching ``route`` (a shell pattern over ``"METHOD /path"``;
        ``count=None``: all until cleared) wait ``delay`` s, then answer ``status`` and/or ``garbage``
        (html, truncated_json, not_jwt, empty, random) instead of the real handler."""
        body = {"route": route, "status": status, "delay": delay, "garbage": garbage, "count": count}
        self._call("POST", "/faults", json=body)

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")
