# dimse-gateway container image.
#
#   docker build -t dimse-gateway .
#   docker run -p 8000:8000 -p 11112:11112 \
#       -v "$PWD/gateway.toml:/etc/dimse-gateway/gateway.toml:ro" dimse-gateway
#
# The configuration must set http_host = "0.0.0.0": the default, 127.0.0.1, is the
# container's own loopback and a published port would reach nothing (the health
# check below would still pass, since it runs inside the container).
# Only Docker Hub's python image and PyPI are fetched: no apt packages are installed
# (every dependency ships manylinux wheels for CPython 3.11), so no compiler either.

# ---------------------------------------------------------------- builder
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# pyproject.toml names README.md as the package's readme: the build needs it.
COPY pyproject.toml README.md ./
COPY app/ ./app/
# The same install as scripts/demo.sh (minus -e): the project and its pinned
# dependencies from pyproject.toml, nothing else. tests/unit/test_container_files.py
# runs this step for real.
RUN pip install --no-cache-dir . \
    && dimse-gateway --help >/dev/null

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="dimse-gateway" \
      org.opencontainers.image.description="DICOMweb (QIDO-RS, WADO-RS) in front of DIMSE-only PACS" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# Fixed uid/gid so that host-side volume permissions are predictable.
# The work directory is created and chowned before VOLUME: a fresh named volume
# copies the ownership from the image, so the non-root user can write to it.
# (Not --system: useradd warns about a system uid above SYS_UID_MAX. --no-log-init:
# no sparse lastlog/faillog entries sized by the high uid.)
RUN groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid gateway --no-create-home --no-log-init \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/dimse-gateway /etc/dimse-gateway \
    && chown gateway:gateway /var/lib/dimse-gateway \
    && chmod 0750 /var/lib/dimse-gateway

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# Numeric, so that runtimes can verify "non-root" without reading /etc/passwd
# (Kubernetes runAsNonRoot refuses a named USER).
USER 10001:10001
VOLUME ["/var/lib/dimse-gateway"]

# 8000: HTTP (DICOMweb); 11112: the gateway's DICOM storage SCP (C-MOVE destination).
EXPOSE 8000 11112

# No curl in slim: ask Python. The empty ProxyHandler keeps an inherited
# HTTP_PROXY from routing the probe of our own loopback through a proxy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["dimse-gateway"]
CMD ["serve", "--config", "/etc/dimse-gateway/gateway.toml"]
