"""The whole local upstream: SeaweedFS as the CDN plus the reference Resource API, on loopback ports.

    with Stack(tmp_path) as stack:
        stack.add_user("op@x", "pw", ["Operator"])
        stack.publish("models", "m.bin", b"...")              # format 2: sealed, with a manifest
        stack.publish("models", "old.bin", b"...", format=1)  # the old split under the resource key
        stack.publish("models", "s.bin", b"...", signer=stack.publisher)  # a signed manifest (section 9)
        stack.compromise("models", "s.bin", b"evil")  # the API serves an attacker's model (see compromise)

The API runs as its own process (``python -m devstack.api.server``) so a test can stop and restart it
like a real upstream; both servers come back on the same ports and the same data.

    data_dir/api/   the API's state (see devstack.api.store)
    data_dir/s3/    SeaweedFS data, its S3 identities and its log
    data_dir/publisher/         the stack's publisher key: publisher.key (PKCS#8 PEM), publisher.pub
    data_dir/attacker-s3/       a second SeaweedFS, the attacker's CDN (started by the first compromise)
"""

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from devstack import signing
from devstack.api.admin_client import AdminClient
from devstack.ports import free_port
from devstack.processes.seaweed import SeaweedFS
from devstack.split import Published, Source, manifest_name, publish_resource
from devstack.wait import until

REPO_ROOT = Path(__file__).resolve().parent.parent


class Stack:
    def __init__(
        self,
        data_dir: Path | str,
        api_port: int | None = None,
        s3_port: int | None = None,
        admin_secret: str | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.api_port = api_port or free_port()
        self.admin_secret = admin_secret or secrets.token_urlsafe(24)
        self.s3 = SeaweedFS(self.data_dir / "s3", s3_port)
        self.admin = AdminClient(self.api_url, self.admin_secret)
        self._api: subprocess.Popen | None = None
        self._s3_clients: dict = {}
        self.attacker_s3: SeaweedFS | None = None  # the attacker's CDN, once a compromise needs it
        self._publisher: signing.Publisher | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    def start(self) -> "Stack":
        self._launch_api()  # the API boots while weed does; weed is the slow one
        try:
            self.s3.start()
            self._wait_api()
            self.write_cdn_yaml()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stop_api()
        self.s3.stop()
        if self.attacker_s3 is not None:
            self.attacker_s3.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _launch_api(self) -> None:
        if self._api is not None and self._api.poll() is None:
            return
        api_dir = self.data_dir / "api"
        api_dir.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            DEVSTACK_ADMIN_SECRET=self.admin_secret,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        command = [
            sys.executable,
            "-m",
            "devstack.api.server",
            "--data-dir",
            str(api_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
        ]
        with open(self.data_dir / "api.log", "ab") as log:
            self._api = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_api(self, timeout: float = 30.0) -> None:
        until(self._api_answers, timeout, f"the Resource API did not answer within {timeout} s", every=0.05)

    def _api_answers(self) -> bool:
        if self._api.poll() is not None:
            raise RuntimeError(
                f"the Resource API exited with {self._api.returncode}; see {self.data_dir / 'api.log'}"
            )
        return self.admin.healthy()

    def start_api(self) -> None:
        self._launch_api()
        self._wait_api()

    def stop_api(self) -> None:
        if self._api is None:
            return
        if self._api.poll() is None:
            self._api.send_signal(signal.SIGTERM)
            try:
                self._api.wait(10)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait()
        self._api = None

    @property
    def api_running(self) -> bool:
        return self._api is not None and self._api.poll() is None

    def start_s3(self) -> None:
        self.s3.start()

    def stop_s3(self) -> None:
        self.s3.stop()

    # --- S3 -------------------------------------------------------------------------------------

    def s3_client(self, identity: str = "admin", endpoint: str | None = None):
        """A boto3 client as ``admin``, ``downloader`` or ``uploader``; ``endpoint``: e.g. a fault proxy."""
        key = (identity, endpoint)
        if key not in self._s3_clients:
            self._s3_clients[key] = self.s3.client(identity, endpoint)
        return self._s3_clients[key]

    def s3_admin_client(self):
        return self.s3_client("admin")

    def cdn_yaml(self, host: str | None = None) -> str:
        return self.s3.cdn_yaml(host)

    def write_cdn_yaml(self, host: str | None = None) -> None:
        """Stores ``cdn.yaml`` in the API's root folder; ``host`` sends the loader elsewhere (a proxy)."""
        self.admin.put_file(None, "cdn.yaml", self.cdn_yaml(host).encode())

    # --- the API's state ------------------------------------------------------------------------

    def add_user(self, email: str, password: str, roles: list[str] | tuple[str, ...]) -> dict:
        return self.admin.add_user(email, password, roles)

    def reset_hardware(self, email: str) -> None:
        self.admin.reset_hardware(email)

    def publish(
        self,
        folder: str,
        name: str,
        data_or_path: Source,
        format: int = 2,
        signer: signing.Publisher | None = None,
    ) -> Published:
        """Publishes ``name`` in format 2 (sealed, with ``name.manifest``) or, ``format=1``, the old way.
        ``signer`` (e.g. ``self.publisher``): the manifest is a DSSE envelope signed by it (section 9)."""
        return publish_resource(
            self.admin,
            self.s3_admin_client(),
            folder,
            name,
            data_or_path,
            tmp_dir=self.data_dir,
            format=format,
            signer=signer,
        )

    def put_file(self, folder: str | None, name: str, data: Source) -> dict:
        return self.admin.put_file(folder, name, data)

    def delete_file(self, folder: str | None, name: str) -> bool:
        """Removes a file the API stores (e.g. ``N.small`` or ``N.manifest``); False when there was none."""
        return self.admin.delete_file(folder, name)

    def manifest(self, folder: str, name: str) -> dict | None:
        """The manifest stored for resource ``name`` (parsed JSON: a signed one is its envelope), or None when
        it has none (format 1)."""
        stored = self.admin.get_file(folder, manifest_name(name))
        return None if stored is None else json.loads(stored)

    def stored_manifest(self, folder: str, name: str) -> bytes | None:
        """The bytes stored as ``name.manifest`` (plain JSON or an envelope), or None."""
        return self.admin.get_file(folder, manifest_name(name))

    def open_manifest(self, folder: str, name: str, trusted: signing.TrustedKeys | None = None) -> dict:
        """``M`` of the signed manifest stored for ``name`` (e.g. one a loader uploaded), verified under
        ``trusted`` (default: the stack's publisher key); ValueError when it is missing, unsigned or bad."""
        stored = self.stored_manifest(folder, name)
        if stored is None:
            raise ValueError(f"{folder}/{name} has no manifest")
        return signing.open_envelope(
            stored, self.publisher.public_key if trusted is None else trusted, folder, name
        )

    def put_manifest(self, folder: str, name: str, manifest: bytes | dict) -> None:
        """Stores ``manifest`` as ``name.manifest``: bytes as they are (a broken one), a dict as JSON."""
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode("utf-8")
        self.admin.put_file(folder, manifest_name(name), data)

    # --- the stack's publisher (contract section 9) --------------------------------------------------

    @property
    def publisher_key_files(self) -> tuple[Path, Path]:
        """``(private, public)`` PEM files of the stack's publisher key, made once in the data directory:
        a loader's PUBLISHER_KEY_FILE and TRUSTED_PUBLISHERS."""
        return signing.new_publisher_key(self.data_dir / "publisher")

    @property
    def publisher(self) -> signing.Publisher:
        if self._publisher is None:
            self._publisher = signing.Publisher(self.publisher_key_files[0])
        return self._publisher

    # --- an attacker who controls the Resource API (contract section 9) ------------------------------

    def start_attacker_s3(self) -> SeaweedFS:
        """The attacker's own S3 server, a second SeaweedFS beside the stack's (stopped with the stack)."""
        if self.attacker_s3 is None:
            self.attacker_s3 = SeaweedFS(self.data_dir / "attacker-s3")
        return self.attacker_s3.start()

    def compromise(
        self,
        folder: str,
        name: str,
        data: Source,
        *,
        signer: signing.Publisher | None = None,
        format: int = 2,
        cdn_host: str | None = None,
    ) -> Published:
        """The whole attack of one who controls only the Resource API: the attacker's model ``data`` is
        published as ``folder``/``name`` on the attacker's S3 server (start_attacker_s3), its small part and
        manifest are served by the API in place of the real ones, and so is a ``cdn.yaml`` that points at the
        attacker's server (``cdn_host``: e.g. a proxy in front of it) with keys valid there. The real files
        stay stored; end_compromise() serves them again.

        ``format=2``: a fresh data key and an unsigned manifest (the attacker has no publisher key), or one
        signed by ``signer`` (a key of the attacker's own, e.g. ``signing.Publisher.generate()``).
        ``format=1``: the attacker's model under the resource key, and the manifest withheld (a 404).

        A loader reads cdn.yaml after its login: log in again after this (and after end_compromise)."""
        attacker = self.start_attacker_s3()
        published = publish_resource(
            _Substitutes(self.admin),
            attacker.client("admin"),
            folder,
            name,
            data,
            tmp_dir=self.data_dir,
            format=format,
            signer=signer,
        )
        self.admin.put_substitute(None, "cdn.yaml", attacker.cdn_yaml(cdn_host).encode())
        return published

    def substitute(self, folder: str | None, name: str, data: bytes) -> None:
        """One file of a compromise: the API serves ``data`` for ``folder``/``name`` (None: the root)."""
        self.admin.put_substitute(folder, name, data)

    def withhold(self, folder: str | None, name: str) -> None:
        """One file of a compromise: the API answers 404 for ``folder``/``name``."""
        self.admin.withhold(folder, name)

    def compromised(self) -> dict[str, list[str]]:
        return self.admin.compromised()

    def end_compromise(self) -> None:
        """The API serves the real files again (the attacker's S3 server keeps running until stop())."""
        self.admin.end_compromise()

    # --- the CDN's objects (as admin) -----------------------------------------------------------

    def read_cdn(self, folder: str, key: str) -> bytes:
        """The whole object ``folder/key`` (test-sized objects only)."""
        return self.s3_admin_client().get_object(Bucket=folder, Key=key)["Body"].read()

    def replace_cdn(self, folder: str, key: str, data: bytes) -> str:
        """Overwrites ``folder/key`` with ``data`` (as anyone with the uploader keys could); the new ETag."""
        return self.s3_admin_client().put_object(Bucket=folder, Key=key, Body=data)["ETag"]

    def tamper_cdn(self, folder: str, key: str, offset: int, xor: int = 0x01) -> str:
        """Flips the bits ``xor`` of the byte at ``offset`` of ``folder/key`` (negative: from the end),
        rewriting the object in place; the new ETag. Reads the object whole: test-sized objects only."""
        if not 0 < xor < 256:
            raise ValueError("xor must change the byte: 1..255")
        data = bytearray(self.read_cdn(folder, key))
        data[offset] ^= xor
        return self.replace_cdn(folder, key, bytes(data))

    def set_key_fragment(self, fragment: bytes | None) -> None:
        self.admin.set_key_fragment(fragment)

    def set_token_ttl(self, seconds: float) -> None:
        self.admin.set_config(token_ttl_seconds=seconds)

    def set_claims_style(self, style: str) -> None:
        self.admin.set_config(claims_style=style)

    def counters(self) -> dict[str, int]:
        return self.admin.counters()

    def reset_counters(self) -> None:
        self.admin.reset_counters()

    def set_fault(self, route: str, **fault) -> None:
        """See AdminClient.set_fault (status, delay, garbage, count)."""
        self.admin.set_fault(route, **fault)

    def set_trickle(self, route: str, rate: float, **fault) -> None:
        """A fault (see set_fault: status, delay, garbage, count) whose answer's body, the real handler's or
        the fault's, is sent ``rate`` bytes a second (devstack.api.faults)."""
        body = {"route": route, "status": None, "delay": 0.0, "garbage": None, "count": 1, **fault}
        self.admin._call("POST", "/faults", json={**body, "trickle": rate})

    def clear_faults(self) -> None:
        self.admin.clear_faults()


class _Substitutes:
    """What publish_resource writes to the API, installed as a compromise's substitutes instead."""

    def __init__(self, admin: AdminClient):
        self._admin = admin

    def put_file(self, folder: str | None, name: str, data: bytes) -> dict:
        return self._admin.put_substitute(folder, name, data)

    def delete_file(self, folder: str | None, name: str) -> bool:
        self._admin.withhold(folder, name)
        return True
