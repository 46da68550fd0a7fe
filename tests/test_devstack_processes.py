"""The suite's Docker Engine helper (devstack/processes/dockerd.py) does what the unlock tests rely on."""

import io
import tarfile
import uuid

import pytest
from docker.errors import DockerException

from devstack.processes.dockerd import import_image

pytestmark = pytest.mark.docker


@pytest.fixture
def two_images(request):
    """Two freshly imported images on the engine the test asks for; removed afterwards."""
    engine = request.getfixturevalue(request.param)
    client = engine.client()
    run = uuid.uuid4().hex[:8]
    tags = {
        f"azaion-test/alpha-{run}:1": {"alpha.txt": b"alpha\n"},
        f"azaion-test/beta-{run}:2.0": {"etc/beta.conf": b"beta = 2\n", "bin/tool": b"#!/bin/sh\n"},
    }
    ids = {tag: import_image(client, tag, files) for tag, files in tags.items()}
    yield engine, tags, ids
    client = engine.client()  # the engine may have been restarted under the first client
    for tag in tags:
        client.images.remove(tag, force=True)
    client.close()


def _tags(client) -> set[str]:
    return {tag for image in client.images.list() for tag in image.tags}


def _read_file(client, image: str, path: str) -> tuple[bytes, int]:
    """Content and mode of `path` in `image`, read from a created (never started) container."""
    container = client.containers.create(image, command=["/none"])
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            return tar.extractfile(member).read(), member.mode
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("two_images", ["dockerd"], indirect=True)
def test_imported_images_are_listed_with_their_files(two_images):
    engine, tags, ids = two_images
    client = engine.client()
    assert set(tags) <= _tags(client)
    for tag, image_id in ids.items():
        assert client.images.get(tag).id == image_id
    alpha, beta = sorted(tags)
    assert _read_file(client, alpha, "/alpha.txt")[0] == b"alpha\n"
    content, mode = _read_file(client, beta, "/bin/tool")
    assert content == b"#!/bin/sh\n"
    assert mode & 0o111, "a script must be imported executable"


@pytest.mark.parametrize("two_images", ["private_dockerd"], indirect=True)
def test_restart_keeps_socket_and_images(two_images):
    engine, tags, ids = two_images
    host, pid = engine.host, engine.pid
    engine.restart()
    assert engine.host == host
    assert engine.pid != pid, "restart() must start a new dockerd process"
    client = engine.client()
    assert set(tags) <= _tags(client)
    assert {tag: client.images.get(tag).id for tag in tags} == ids


def test_stopped_engine_does_not_answer_until_started(private_dockerd):
    private_dockerd.stop()
    try:
        assert not private_dockerd.running
        with pytest.raises(DockerException):
            private_dockerd.client(timeout=3).ping()
    finally:
        private_dockerd.start()
    assert private_dockerd.client().ping()
