# bidsdl: one image for `docker run` on a laptop and `singularity exec` on a cluster.
#
#   docker build -t bidsdl:0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker build -t bidsdl:0.1.0-cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# Layers go from what changes least (system Python, torch, dependencies) to what changes most (bidsdl).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# Where pip finds torch: CPU wheels by default; a CUDA index (e.g. .../whl/cu126) for GPU images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# More pip options for the build machine, e.g. "--find-links /wheels" with a wheel folder mounted
# (podman build --volume WHEEL_FOLDER:/wheels:ro); the recipe itself needs none.
ARG PIP_EXTRA_ARGS=""

LABEL org.opencontainers.image.title="bidsdl" \
      org.opencontainers.image.description="BIDS App for reproducible deep learning on brain MRI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/bidsdl/bidsdl" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="bidsdl developers"

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv

# torch first and pinned (the constraints file): an unpinned resolve pulls multi-GB CUDA builds.
COPY constraints.txt /opt/bidsdl/constraints.txt
# hadolint ignore=SC2086
RUN pip install ${PIP_EXTRA_ARGS} -c /opt/bidsdl/constraints.txt --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0

# The dependencies of pyproject.toml (runtime + export), without bidsdl itself: cached until they change.
COPY pyproject.toml /opt/bidsdl/src/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/opt/bidsdl/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['export']))" > /tmp/requirements.txt \
 && pip install ${PIP_EXTRA_ARGS} -c /opt/bidsdl/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md /opt/bidsdl/src/README.md
COPY pipeline /opt/bidsdl/src/pipeline
COPY templates /opt/bidsdl/src/templates
RUN pip install --no-deps /opt/bidsdl/src \
 && rm -rf /opt/bidsdl/src \
 && bidsdl --version

COPY entrypoint /opt/bidsdl/entrypoint

# A HOME any UID can write (docker run --user, Singularity); caches under it or /tmp, never in the image.
RUN useradd --create-home --uid 1000 --home-dir /home/bidsdl bidsdl \
 && chmod 1777 /home/bidsdl \
 && chmod 0755 /opt/bidsdl/entrypoint
ENV HOME=/home/bidsdl \
    MPLCONFIGDIR=/tmp/bidsdl-matplotlib \
    XDG_CACHE_HOME=/tmp/bidsdl-cache \
    NIPYPE_NO_ET=1 \
    BIDSDL_CONTAINER=docker \
    BIDSDL_IMAGE_TAG=bidsdl:${VERSION}
USER 1000:1000
WORKDIR /tmp

ENTRYPOINT ["/opt/bidsdl/entrypoint"]
CMD ["--help"]
