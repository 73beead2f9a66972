# syntax=docker/dockerfile:1
#
# The tensorgate gateway image (docs/deploy.md). Two flavors:
#
#   FLAVOR=cpu (default)  python:3.11-slim; torch 2.13.0 CPU build (from PyTorch's CPU index),
#                         tensorflow-cpu, onnxruntime. 2.7-2.8 GB (measured: 2.81 GB).
#   Both flavors ship the native front end (native/, Rust), built in its own stage into a
#   wheel: the image has the wheel's extension, not the Rust toolchain.
#
#   FLAVOR=cuda           nvidia/cuda runtime + cuDNN (Ubuntu 24.04) with Python 3.11; torch
#                         2.13.0 CUDA build (PyPI), tensorflow[and-cuda], onnxruntime-gpu, at
#                         the versions pyproject.toml pins. Needs the NVIDIA container toolkit
#                         on the host, and `device = "cuda"` in the models' config.toml.
#
#   docker build -t tensorgate:0.1.0 .
#   docker build --build-arg FLAVOR=cuda -t tensorgate:0.1.0-cuda .
#   docker run --rm -p 8001:8001 -p 8002:8002 -v "$PWD/models:/models:ro" tensorgate:0.1.0
#
# The model repository is /models: mount it (above), or bake one into the image by giving
# the `models` stage another directory: docker build --build-context models=./models .
#
# Needs BuildKit (the default builder since Docker 23): heredocs, cache and secret mounts,
# and only the stages FLAVOR selects are built. Podman/Buildah: add --format docker, or the
# image is OCI, which has no HEALTHCHECK (it is dropped with a warning).
#
# Behind a package mirror or a TLS-intercepting proxy (docs/deploy.md):
#   --build-arg PIP_INDEX_URL=URL  --build-arg PIP_EXTRA_INDEX_URL="URL URL"
#   --build-arg TORCH_CPU_INDEX=URL (or '' when the indexes above have the +cpu torch wheels)
#   --secret id=pip_ca,src=ca-bundle.pem   (the CA bundle pip trusts)
#   --secret id=pip_conf,src=pip.conf      (a whole pip configuration, e.g. with credentials)

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# Baked-in models: empty unless replaced with --build-context models=DIR.
FROM scratch AS models

# ---- one base per flavor: Python 3.11 and tini ------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04 has Python 3.12; the pins are tested with 3.11, which deadsnakes provides.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3.11 /usr/local/bin/python
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${FLAVOR} AS base

# ---- native: the Rust front end (native/), built into a wheel; only the wheel ships ------
# Debian bookworm's python3 is 3.11, the image's; the crate needs no system protoc (vendored).
FROM rust:1-slim-bookworm AS native
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/maturin \
 && /opt/maturin/bin/pip install --no-cache-dir maturin==1.16.0
WORKDIR /src
COPY protos ./protos
COPY native ./native
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    /opt/maturin/bin/maturin build --release --manifest-path native/Cargo.toml \
      --interpreter python3 --out /wheels

# ---- builder: a venv with the pinned frameworks, then tensorgate ------------------------
FROM base AS builder
ARG FLAVOR
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# pip reads these itself (space-separated for the extra indexes); unset or empty: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall
# 2 GB of frameworks. The pins are pyproject's; the cuda flavor takes the GPU builds of the
# same versions.
COPY pyproject.toml ./
RUN python - pyproject.toml "$FLAVOR" > requirements.txt <<'EOF'
import sys
import tomllib

pyproject, flavor = sys.argv[1], sys.argv[2]
project = tomllib.load(open(pyproject, "rb"))["project"]
extras = project["optional-dependencies"]


def expand(extra):
    for requirement in extras[extra]:
        if requirement.startswith("tensorgate["):
            for inner in requirement[len("tensorgate[") : -1].split(","):
                yield from expand(inner.strip())
        else:
            yield requirement


# The build backend too, so that installing tensorgate itself needs no index.
build = tomllib.load(open(pyproject, "rb"))["build-system"]["requires"]
requirements = [*project["dependencies"], *expand("all"), *build]
if flavor == "cuda":
    gpu = {"onnxruntime": "onnxruntime-gpu", "tensorflow-cpu": "tensorflow[and-cuda]"}
    for i, requirement in enumerate(requirements):
        name, sep, version = requirement.partition("==")
        if sep and name in gpu:
            requirements[i] = f"{gpu[name]}=={version}"
print("\n".join(requirements))
EOF
# cpu: torch==2.13.0 resolves to 2.13.0+cpu from PyTorch's CPU index (PyPI's Linux wheel is
# the multi-GB CUDA build). cuda: PyPI's CUDA builds. The only step that downloads.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_ca \
    --mount=type=secret,id=pip_conf \
    set -- -r requirements.txt \
 && if [ "$FLAVOR" = cpu ] && [ -n "$TORCH_CPU_INDEX" ]; then \
        set -- "$@" --extra-index-url "$TORCH_CPU_INDEX"; fi \
 && if [ -f /run/secrets/pip_ca ]; then set -- "$@" --cert /run/secrets/pip_ca; fi \
 && if [ -f /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
 && pip install "$@"

COPY README.md ./
COPY tensorgate ./tensorgate
COPY server ./server
COPY backends ./backends
COPY clients ./clients
COPY protos ./protos
RUN pip install --no-deps --no-build-isolation . && pip check
# The native front end: the wheel from the native stage (its one dependency, numpy, is here).
COPY --from=native /wheels /wheels
RUN pip install --no-index --find-links /wheels tensorgate-native && rm -rf /wheels

# ---- runtime: the venv, a non-root user, the server as the container's command ----------
FROM base AS runtime
ARG FLAVOR
LABEL org.opencontainers.image.title="tensorgate" \
      org.opencontainers.image.description="Open Inference Protocol gRPC gateway ($FLAVOR)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 tensorgate \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin tensorgate
COPY --from=builder /opt/venv /opt/venv
COPY --from=models / /models/
# TENSORGATE_PORT_FILE: `serve` writes the ports it serves on there, whatever its --port,
# and `tensorgate health` reads it (/tmp: give a read-only container a tmpfs there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TENSORGATE_IMAGE_FLAVOR=$FLAVOR \
    TENSORGATE_PORT_FILE=/tmp/tensorgate-ports.json
USER 10001:10001
WORKDIR /home/tensorgate

# gRPC (inference, health, reflection) and Prometheus /metrics.
EXPOSE 8001 8002

# grpc.health.v1 Check on the whole server, on the port in $TENSORGATE_PORT_FILE: SERVING
# once the models are loaded (at least --require-models of them), NOT_SERVING while
# draining. Loading TensorFlow models can take a minute: hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["tensorgate", "health", "--timeout", "3"]

# Exec form: tini is PID 1 and forwards SIGTERM to the server, which drains (health
# NOT_SERVING, accepted calls finish within --drain-timeout) and exits 0. `docker stop`
# waits 10 s by default: give it --time 35 for the default 30 s drain.
ENTRYPOINT ["/usr/bin/tini", "--", "tensorgate"]
# --require-models 1: a container with nothing mounted at /models is unhealthy.
CMD ["serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002", "--require-models", "1"]
