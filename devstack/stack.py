"""The whole local upstream: SeaweedFS as the CDN plus the reference Resource API, on loopback ports.

    with Stack(tmp_path) as stack:
        stack.add_user("op@x", "pw", ["Operator"])
        stack.publish("models", "m.bin", b"...")

The API runs as its own process (``python -m devstack.resource_api``) so a test can stop and restart it
like a real upstream; both servers come back on the same ports and the same data.

    data_dir/api/   the API's state (see devstack.store)
    data_dir/s3/    SeaweedFS data, its S3 identities and its log
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from devstack.admin import AdminClient
from devstack.ports import free_port
from devstack.seaweed import SeaweedFS
from devstack.split import Published, Source, publish_resource

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
            "devstack.resource_api",
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._api.poll() is not None:
                raise RuntimeError(
                    f"the Resource API exited with {self._api.returncode}; see {self.data_dir / 'api.log'}"
                )
            if self.admin.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"the Resource API did not answer within {timeout} s")

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

    def publish(self, folder: str, name: str, data_or_path: Source) -> Published:
        return publish_resource(
            self.admin, self.s3_admin_client(), folder, name, data_or_path, tmp_dir=self.data_dir
        )

    def put_file(self, folder: str | None, name: str, data: Source) -> dict:
        return self.admin.put_file(folder, name, data)

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

    def clear_faults(self) -> None:
        self.admin.clear_faults()
