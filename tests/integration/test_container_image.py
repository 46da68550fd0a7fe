"""The Dockerfile builds and runs here, for this machine's architecture and for linux/arm64 (the devices'),
the latter under qemu emulation: each on a base image made from Debian packages for that architecture
(no registry pull), on the suite's Docker Engine. The running container answers /health from the host,
logs in, loads a model byte-identical to what was published, uploads one, and counts it all in /metrics,
against the dev stack; it runs as non-root, and its filesystem holds extensions for its architecture
only, no sources, no compiler and no tests.

Every test below runs once per architecture (the module-scoped `arch` fixture); the mechanics live in
tests/support/container_image.py. Base root filesystems and built images are cached: see `image`.
"""

import base64
import collections
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import crypto
from devstack.ports import free_port
from devstack.wait import until
from tests.integration.conftest import PASSWORD
from tests.support import container_image as ci
from tests.support.docker_fixtures import unavailable

# The first test of a group carries debootstrap and the image build when they are not cached: measured
# on two busy cores, 4 + 13 min for arm64 (emulated), 8 min for the native build.
pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.timeout(1800)]
EMULATED_TIMEOUT = 5400

TESTED = [ci.ARCHES[name] for name in dict.fromkeys([ci.native_arch(), "arm64"]) if name in ci.ARCHES]
BIN_DIRS = {"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "opt/venv/bin"}
# gcc, gcc-12, x86_64-linux-gnu-gcc-12, aarch64-linux-gnu-ld ... and Cython's command-line tools.
COMPILER = re.compile(
    r"^(?:[\w.]+-linux-gnu\w*-)?(?:cc|c\+\+|gcc|g\+\+|cpp|clang|tcc|as|ld|cython|cythonize)(?:-[\d.]+)?$"
)
EXTENSION = re.compile(r"\.so(?:\.[\d.]+)?$")
MiB = 1024 * 1024


def _log(message: str) -> None:
    print(f"[container-image] {message}", flush=True)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(a, id=a.name, marks=[pytest.mark.timeout(EMULATED_TIMEOUT)] if a.emulated else [])
        for a in TESTED
    ],
)
def arch(request) -> ci.Arch:
    """The architecture the image is built for: this machine's, then arm64 through qemu."""
    problem = ci.emulation_problem(request.param)
    if problem:
        unavailable(problem)
    return request.param


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ci.cache_dir(lambda: tmp_path_factory.mktemp("image-cache"))


@pytest.fixture(scope="module")
def base_image(dockerd, arch, cache) -> str:
    """A Debian bookworm base for `arch`, from debootstrap: the base the Dockerfile is told to use."""
    if os.geteuid() != 0:
        unavailable("building the Debian base image with debootstrap needs root")
    if shutil.which("debootstrap") is None:
        unavailable("debootstrap is missing (scripts/system-deps installs it)")
    try:
        tarball = ci.bookworm_rootfs(cache, arch, log=_log)
    except ci.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    tag = f"azaion-loader-base:bookworm-{arch}"
    started = time.monotonic()
    ci.load_base(dockerd.client(timeout=900), arch, tarball, tag)
    _log(f"docker load {tag}: {time.monotonic() - started:.0f} s")
    # Left in place on a shared engine: it is deterministic, and another session may be building on it.
    return tag


@pytest.fixture(scope="module")
def image(dockerd, arch, base_image, cache):
    """The image the repository's Dockerfile makes on the base, for `arch`: built when the build context
    or the base changed since the last build on this machine, else loaded from that build's archive in
    the cache (everything below runs against it either way)."""
    client = dockerd.client(timeout=3600)
    tag = f"azaion-loader:test-{arch}-{uuid.uuid4().hex[:8]}"
    try:
        info = ci.cached_build(client, tag, base_image, arch, cache, log=_log)
    except ci.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    built = client.images.get(tag)
    _log(
        f"docker build {arch}: {info['build_seconds']} s{' (cached)' if info['cached'] else ''};"
        f" image size {built.attrs['Size'] / 1e6:.0f} MB"
    )
    yield built
    # noprune keeps the parent layers: they are the engine's build cache for the next run.
    client.images.remove(built.id, force=True, noprune=True)


@pytest.fixture(scope="module")
def container(dockerd, arch, image, stack, cdn_proxy):
    """The image running on the engine with host networking, against the dev stack on this machine (the
    CDN behind the suite's fault proxy, as for every loader in tests/integration)."""
    if not dockerd.host.startswith("unix://"):
        unavailable(
            f"the container must reach the dev stack on this machine's loopback; {dockerd.host} is not"
        )
    client = dockerd.client()
    port = free_port()
    name = f"azaion-loader-test-{arch}-{uuid.uuid4().hex[:8]}"
    running = client.containers.run(
        image.id,
        detach=True,
        network_mode="host",
        platform=arch.platform,
        # Its own name, as an app in another container on its network would call it (docs/container.md).
        environment={"LOADER_PORT": str(port), "RESOURCE_API_URL": stack.api_url, "ALLOWED_HOSTS": name},
        name=name,
    )
    url = f"http://127.0.0.1:{port}"

    def logs():
        return running.logs().decode(errors="replace")

    def healthy():
        running.reload()
        if running.status == "exited":
            pytest.fail(f"the container exited:\n{logs()}", pytrace=False)
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        started, limit = time.monotonic(), 180
        until(healthy, limit, lambda: f"no answer on {url}/health within {limit} s:\n{logs()}", every=0.5)
        _log(f"{arch}: /health answered {time.monotonic() - started:.1f} s after the start")
        yield running, url
    finally:
        running.remove(force=True, v=True)


@pytest.fixture(scope="module")
def exported(dockerd, image):
    files, machines = ci.export(dockerd.client(timeout=900), image.id)
    top = collections.Counter(name.split("/")[0] for name in files)
    site = sorted({n.split("/")[5] for n in files if n.startswith("opt/venv/lib/") and n.count("/") > 5})
    _log(f"{len(files)} paths, {len(machines)} ELF files; per top-level dir: {dict(sorted(top.items()))}")
    _log(f"/opt/venv site-packages: {site}")
    return files, machines


@pytest.fixture(scope="module")
def files(exported) -> dict[str, tarfile.TarInfo]:
    return exported[0]


@pytest.fixture(scope="module")
def added_files(dockerd, base_image, files) -> set[str]:
    """What the Dockerfile put on top of the base (Debian's own docs ship an example .c file)."""
    return set(files) - set(ci.export(dockerd.client(timeout=900), base_image)[0])


# --- the running container --------------------------------------------------------------------------


def test_health_answers_from_the_host(container):
    _, url = container
    response = httpx.get(url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


def test_answers_only_its_own_names_and_no_web_page(container):
    """Contract section 10: it listens on 0.0.0.0 inside, and still answers only the loopback names and
    the names in ALLOWED_HOSTS (here: the container's own), never a request that carries Origin."""
    running, url = container
    for host in ("attacker.example", "127.0.0.1.nip.io", f"{running.name}.attacker.example"):
        r = httpx.get(url + "/health", headers={"Host": host}, timeout=5)
        assert r.status_code == 421 and "ALLOWED_HOSTS" in r.json()["detail"], (host, r.text)
    r = httpx.post(url + "/login", headers={"Origin": "http://attacker.example"}, json={}, timeout=5)
    assert r.status_code == 403 and r.headers["content-type"] == "application/json", r.text
    r = httpx.get(url + "/health", headers={"Host": f"{running.name}:8080"}, timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "healthy"}
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/health", timeout=5).status_code == 200


def test_runs_on_its_architecture(container, image, arch):
    running, _ = container
    assert (image.attrs["Os"], image.attrs["Architecture"]) == ("linux", arch.name)
    result = running.exec_run(["python3", "-c", "import platform; print(platform.machine())"])
    assert result.output.decode().strip() == arch.triplet.split("-")[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _samples(metrics_text: str) -> list:
    return [sample for family in text_string_to_metric_families(metrics_text) for sample in family.samples]


def test_logs_in_loads_uploads_and_counts_against_the_dev_stack(container, arch, stack, proxy):
    running, url = container
    http = httpx.Client(base_url=url, timeout=600)

    # A sealed (format 2) model of three 4 MiB blocks, the last one partial, loaded by an operator.
    model, published = f"image-{arch}-{uuid.uuid4().hex[:8]}.bin", os.urandom(9 * MiB + 3)
    stack.publish("models", model, published)
    operator = f"op-{uuid.uuid4().hex[:8]}@azaion.local"
    stack.add_user(operator, PASSWORD, ["Operator"])
    r = http.post("/login", json={"email": operator, "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["email"] == operator and r.json()["user"]["role"] == "Operator"
    r = http.post(f"/load/{model}", json={"folder": "models"})
    assert r.status_code == 200, r.text
    _log(f"{arch}: /load {model}: sha256 {_sha256(r.content)}, published {_sha256(published)}")
    assert r.content == published and r.headers["content-length"] == str(len(published))
    assert proxy.count("GET", f"/models/{model}.big") >= 1, "the big part came from the CDN"

    # The hardware line the API bound the account to is the one read inside the container.
    bound = next(user["hardware"] for user in stack.admin.users() if user["email"] == operator)
    inside = running.exec_run(
        ["python3", "-c", "import hardware_service; print(hardware_service.collect_hardware())"]
    )
    assert inside.exit_code == 0, inside.output.decode(errors="replace")
    _log(f"{arch}: hardware line {bound!r}")
    assert inside.output.decode().strip() == bound and bound.startswith("CPU: ")

    # An upload, read back through the container and, as any other reader would, through the contract.
    uploaded, name = os.urandom(5 * MiB + 7), f"image-{arch}-{uuid.uuid4().hex[:8]}-up.bin"
    uploader = f"up-{uuid.uuid4().hex[:8]}@azaion.local"
    stack.add_user(uploader, PASSWORD, ["ResourceUploader"])
    assert http.post("/login", json={"email": uploader, "password": PASSWORD}).status_code == 200
    r = http.post(f"/upload/{name}", files={"data": (name, uploaded)}, data={"folder": "models"})
    assert r.status_code == 200 and r.json() == {"status": "ok", "size": len(uploaded)}, r.text
    small = stack.admin.get_file("models", name + ".small")
    big = stack.s3_admin_client().get_object(Bucket="models", Key=name + ".big")["Body"].read()
    key = base64.b64decode(stack.manifest("models", name)["key"])
    assert crypto.decrypt(key, small + big) == uploaded
    r = http.post(f"/load/{name}", json={"folder": "models"})
    _log(f"{arch}: /upload {name}: sha256 {_sha256(uploaded)}; loaded back: {_sha256(r.content)}")
    assert r.status_code == 200 and r.content == uploaded

    # /metrics counts exactly that.
    r = http.get("/metrics")
    assert r.status_code == 200
    samples = _samples(r.text)
    value = {s.name: s.value for s in samples if not s.labels}
    assert value["loader_bytes_loaded_total"] == len(published) + len(uploaded)
    assert value["loader_bytes_uploaded_total"] == len(uploaded)
    ok = collections.Counter()
    for s in samples:
        if s.name == "loader_requests_total" and (s.labels["method"], s.labels["status"]) == ("POST", "200"):
            ok[s.labels["route"].split("/")[1]] += int(s.value)
    assert (ok["login"], ok["load"], ok["upload"]) == (2, 2, 1), ok


def test_healthcheck_command_passes_inside(container, image):
    running, _ = container
    check = image.attrs["Config"]["Healthcheck"]["Test"]
    assert check[0] == "CMD", check
    result = running.exec_run(check[1:])
    assert result.exit_code == 0, result.output.decode(errors="replace")


@pytest.fixture(scope="module")
def socket_container(dockerd, arch, image):
    """The image run with LOADER_SOCKET in a directory of this machine mounted into it, with no network at
    all: (container, the socket's path on this machine). The directory belongs to the image's user, as a
    volume shared with the apps would (docs/container.md)."""
    if not dockerd.host.startswith("unix://"):
        unavailable(f"the socket must be in a directory of this machine; {dockerd.host} is not on it")
    uid, gid = (int(n) for n in image.attrs["Config"]["User"].split(":"))
    shared = Path(tempfile.mkdtemp(prefix="azaion-sock-", dir="/tmp"))  # a socket path fits 108 bytes
    os.chown(shared, uid, gid)
    shared.chmod(0o750)
    running = dockerd.client().containers.run(
        image.id,
        detach=True,
        network_mode="none",
        platform=arch.platform,
        environment={"LOADER_SOCKET": "/run/azaion/loader.sock"},
        volumes={str(shared): {"bind": "/run/azaion", "mode": "rw"}},
        name=f"azaion-loader-socket-{arch}-{uuid.uuid4().hex[:8]}",
    )
    path = shared / "loader.sock"

    def answers():
        running.reload()
        if running.status == "exited":
            pytest.fail(f"the container exited:\n{running.logs().decode(errors='replace')}", pytrace=False)
        return path.exists() and _curl_socket(path, "/health")[0] == 200

    try:
        until(answers, 180, lambda: f"no answer on {path}:\n{running.logs().decode(errors='replace')}", 0.5)
        yield running, path
    finally:
        running.remove(force=True, v=True)
        shutil.rmtree(shared, ignore_errors=True)


def _curl_socket(path, route, *args):
    """curl --unix-socket from this machine: (status, body)."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(path),
            *args,
            f"http://localhost{route}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status or 0), body


def test_serves_on_a_socket_in_a_shared_directory(socket_container, image):
    """LOADER_SOCKET (contract section 10): curl on this machine reaches the loader through the socket, whose
    mode is 0660 and group the image's user's; it refuses a foreign Host there too, and listens on no TCP
    port; the HEALTHCHECK command passes in this mode."""
    running, path = socket_container
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_gid == int(image.attrs["Config"]["User"].split(":")[1])
    assert _curl_socket(path, "/health") == (200, b'{"status":"healthy"}')
    assert _curl_socket(path, "/health", "-H", "Host: attacker.example")[0] == 421
    listening = running.exec_run(["python3", "-c", LISTENING])
    assert listening.exit_code == 0 and listening.output.decode().strip() == "[]", listening.output
    check = image.attrs["Config"]["Healthcheck"]["Test"]
    result = running.exec_run(check[1:])
    assert result.exit_code == 0, result.output.decode(errors="replace")


# The local ports in state LISTEN (0A) of the container's TCP sockets, from /proc (no ss or netstat there).
LISTENING = (
    "import os; print([l.split()[1] for f in ('/proc/net/tcp', '/proc/net/tcp6') if os.path.exists(f)"
    " for l in open(f).read().splitlines()[1:] if l.split()[3] == '0A'])"
)


def test_runs_as_non_root(container, image):
    running, _ = container
    user = image.attrs["Config"]["User"]
    assert user and user.split(":")[0] not in ("0", "root"), f"image user is {user!r}"
    result = running.exec_run(["python3", "-c", "import os; print(os.getuid(), os.getgid())"])
    uid, gid = map(int, result.output.split())
    assert uid != 0 and gid != 0


def test_model_cache_volume_is_writable_by_the_service_user(container, image):
    running, _ = container
    cache = dict(item.split("=", 1) for item in image.attrs["Config"]["Env"])["MODEL_CACHE_DIR"]
    result = running.exec_run(["python3", "-c", f"open('{cache}/probe', 'w').write('ok')"])
    assert result.exit_code == 0, result.output.decode(errors="replace")


def test_configuration_for_a_device(image):
    config = image.attrs["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LOADER_HOST"] == "0.0.0.0"
    assert {env["MODEL_CACHE_DIR"], str(PurePosixPath(env["IMAGES_PATH"]).parent)} <= set(config["Volumes"])


# --- what the image holds ---------------------------------------------------------------------------


def test_app_is_main_py_and_every_compiled_module(files, arch):
    modules = sorted(p.stem for p in ci.ROOT.glob("*.pyx"))
    app = sorted(name.removeprefix("app/") for name in files if name.startswith("app/"))
    _log(f"/app: {app}")
    assert "main.py" in app
    for module in modules:
        assert any(f.startswith(f"{module}.cpython-") and f.endswith(f"-{arch.triplet}.so") for f in app), (
            module,
            app,
        )
    assert set(app) == {"main.py"} | {f for f in app if f.endswith(".so")}, "only main.py and .so in /app"


def test_every_extension_and_program_is_for_its_architecture(exported, arch):
    """ELF headers read from the image itself (no readelf or file needed): the loader's extensions, every
    extension the venv's wheels brought, and every program and library of the base."""
    files, machines = exported
    extensions = sorted(
        name
        for name, info in files.items()
        if info.isreg() and name.startswith(("app/", "opt/venv/")) and EXTENSION.search(name)
    )
    assert len(extensions) > len(list(ci.ROOT.glob("*.pyx"))), extensions
    not_elf = [name for name in extensions if name not in machines]
    assert not not_elf, f"extensions that are not ELF: {not_elf}"
    foreign = sorted(
        f"{name}: e_machine {machine:#x}" for name, machine in machines.items() if machine != arch.elf_machine
    )
    _log(f"{arch}: {len(extensions)} extensions, {len(machines)} ELF files")
    assert not foreign, f"not {arch} (e_machine {arch.elf_machine:#x}): {foreign}"


def test_no_source_code_added(added_files):
    _log(f"{len(added_files)} paths added on top of the base image")
    sources = sorted(name for name in added_files if name.endswith((".pyx", ".pxd", ".pxi", ".c", ".h")))
    assert not sources, sources


def _compilers(files: dict[str, tarfile.TarInfo]) -> list[str]:
    found = []
    for name, info in files.items():
        path = PurePosixPath(name)
        if info.isdir():
            continue
        if (str(path.parent) in BIN_DIRS and COMPILER.match(path.name)) or path.name in ("cc1", "cc1plus"):
            found.append(name)
    return sorted(found)


def test_no_compiler_or_build_tools(files):
    assert not _compilers(files)
    build_only = [name for name in files if PurePosixPath(name).name.lower() in ("cython", "python.h")]
    assert not build_only, build_only
    assert not any(name.startswith("opt/build") for name in files), "the build venv stays in the build stage"


def test_no_tests(files):
    assert not [name for name in files if name.split("/")[:2] in (["app", "tests"], ["tests"])]


# Natively only: the check does not depend on the architecture. After a build of the image the build
# stage is in the engine's cache; after that, in the archive cache beside the image.
@pytest.mark.parametrize("arch", [a for a in TESTED if not a.emulated], ids=str, indirect=True)
def test_compiler_check_finds_the_build_stage_compiler(dockerd, arch, base_image, image, cache):
    """The check above can fail: the build stage does hold a compiler."""
    client = dockerd.client(timeout=1800)
    tag = f"azaion-loader-build:test-{uuid.uuid4().hex[:8]}"
    try:
        ci.cached_build(client, tag, base_image, arch, cache, target="build", log=_log)
    except ci.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    stage = client.images.get(tag)
    try:
        compilers = _compilers(ci.export(client, stage.id)[0])
    finally:
        client.images.remove(stage.id, force=True, noprune=True)
    assert any(name.endswith("bin/gcc") for name in compilers), compilers
