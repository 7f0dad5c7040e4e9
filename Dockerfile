# syntax=docker/dockerfile:1
# resultbackend-operator image: `python -m resultbackend_operator` (Kopf) on python:3.11-slim.
#
#   docker build -t resultbackend-operator:0.1.0 .
#
# Two stages: the builder installs the package and its pinned dependencies
# (constraints.txt) into /install; the final stage copies only that tree, so no pip
# cache, build tools or sources end up in the image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator/ operator/
# Every dependency is pinned by constraints.txt (the same file the tests run with).
RUN pip install --prefix=/install -c constraints.txt .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="resultbackend-operator" \
      org.opencontainers.image.description="Provisions Celery result backends (CouchDB, Consul) and injects them into workers" \
      org.opencontainers.image.licenses="Apache-2.0"
# Nothing is written at run time: no .pyc files (the builder compiled them), and the
# root filesystem can be mounted read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Python objects in glibc's heaps, two of them, so that the operator's periodic
# malloc_trim gives memory freed after a burst back (operator/.../memory.py).
ENV PYTHONMALLOC=malloc \
    MALLOC_ARENA_MAX=2
# A named user for uid 10001, so that getpass/pwd lookups (Kopf's default peer
# identity) work also outside Kubernetes. Not "operator": Debian (and so the python
# images) has a group of that name already (gid 37), and groupadd fails on it.
RUN groupadd --system --gid 10001 rbo \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rbo
COPY --from=builder /install /usr/local
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "resultbackend_operator"]
CMD ["--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]
