# Azaion.Loader container image. Docs: docs/container.md.
#
#   docker build -t azaion-loader .
#   docker run -d --name azaion-loader -p 127.0.0.1:8080:8080 \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v azaion-models:/var/lib/azaion/models -v /opt/azaion:/opt/azaion:ro \
#     azaion-loader
#
# Publish the port on 127.0.0.1 only: the loader holds a logged-in session and hands out plaintext
# models to whoever reaches it. It answers only Host names it knows (localhost, 127.0.0.1, [::1],
# ALLOWED_HOSTS) and refuses any request with an Origin header (contract section 10). Apps in other
# containers: ALLOWED_HOSTS=<this container's name> on a user-defined network, or LOADER_SOCKET on a
# shared volume. docs/container.md has the docker run lines.
#
# BASE_IMAGE is used by both stages: the extensions are compiled against the very Python that runs
# them, and the venv built in the first stage points at that interpreter's path.
# Any Debian-based image with python3 3.11 and python3-venv works (the tests use a debootstrap one).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# A compiler for the Cython extensions (and for any dependency without a wheel for this platform).
# The official python images carry Python.h; Debian's python3 needs python3-dev for it.
# Versions are not pinned: the base image tag fixes the Debian release, and point releases drop
# the old package versions from the mirror, which would break a pinned build.
# hadolint ignore=DL3008
RUN set -eu; \
    include="$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')"; \
    dev=""; \
    if [ ! -f "$include/Python.h" ]; then dev=python3-dev; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends gcc libc6-dev $dev; \
    rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The runtime venv: only requirements.txt goes in; it is copied whole into the final stage.
# Some wheels (uvloop, httptools) carry their own Cython/C sources; nothing loads them at runtime, and
# the image is meant to hold no source code at all, so they are dropped.
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \
    && find /opt/venv -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.c' \
        -o -name '*.h' \) -delete

# Build tools live in a separate venv that stays behind in this stage. Their pins are read from
# requirements-dev.txt so the image compiles with the same Cython as `make test`.
COPY requirements-dev.txt ./
RUN grep -iE '^(cython|setuptools|wheel)([=<>~! ]|$)' requirements-dev.txt > build-requirements.txt \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check -r build-requirements.txt

COPY setup.py ./
COPY *.pyx ./
RUN /opt/build/bin/python setup.py build_ext --inplace --parallel "$(nproc)" \
    && mkdir /out \
    && cp ./*.so /out/


FROM ${BASE_IMAGE}
# A fixed uid/gid, so volume ownership and runAsNonRoot checks do not depend on the base image.
ARG LOADER_UID=10001
RUN groupadd --system --gid "${LOADER_UID}" loader \
    && useradd --system --uid "${LOADER_UID}" --gid loader --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin loader \
    && mkdir -p /var/lib/azaion/models /opt/azaion /run/azaion \
    && chown loader:loader /var/lib/azaion/models /opt/azaion /run/azaion

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Code is root-owned and read-only to the service user.
COPY --from=build /out/ ./
COPY main.py ./

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOADER_HOST=0.0.0.0 \
    LOADER_PORT=8080 \
    MODEL_CACHE_DIR=/var/lib/azaion/models \
    IMAGES_PATH=/opt/azaion/images.enc

# The big-part cache survives container replacement; the encrypted archive is provided by the device.
VOLUME ["/var/lib/azaion/models", "/opt/azaion"]

# Docker socket: the loader talks to the engine at DOCKER_HOST (default unix:///var/run/docker.sock).
# The socket is owned by root and a host group (usually `docker`), whose gid differs from host to host,
# so it is not baked in here: run with `--group-add "$(stat -c %g /var/run/docker.sock)"`.
# Access to that socket is root-equivalent on the host; mount it only where unlock is needed.
USER ${LOADER_UID}:${LOADER_UID}

EXPOSE 8080
# GET /health with Host: localhost, on LOADER_SOCKET when it is set, else on the loopback at LOADER_PORT;
# boundary imports only the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import boundary; raise SystemExit(boundary.health_check())"]

CMD ["python3", "main.py"]
