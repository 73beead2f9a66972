# syntax=docker/dockerfile:1
#
# The tensorgate gateway image (docs/deploy.md). Two flavors:
#
#   FLAVOR=cpu (default)  python:3.11-slim; torch 2.13.0 CPU build (from PyTorch's CPU index),
#                         tensorflow-cpu, onnxruntime. About 2.5 GB.
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
# Needs BuildKit (the default builder since Docker 23): heredocs, cache mounts, and only the
# stages FLAVOR selects are built.

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

# ---- builder: a venv with the pinned frameworks, then tensorgate ------------------------
FROM base AS builder
ARG FLAVOR
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
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


requirements = [*project["dependencies"], *expand("all")]
if flavor == "cuda":
    gpu = {"onnxruntime": "onnxruntime-gpu", "tensorflow-cpu": "tensorflow[and-cuda]"}
    for i, requirement in enumerate(requirements):
        name, sep, version = requirement.partition("==")
        if sep and name in gpu:
            requirements[i] = f"{gpu[name]}=={version}"
print("\n".join(requirements))
EOF
# cpu: torch==2.13.0 resolves to 2.13.0+cpu from PyTorch's CPU index (PyPI's Linux wheel is
# the multi-GB CUDA build). cuda: PyPI's CUDA builds.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$FLAVOR" = cpu ]; then extra="--extra-index-url $TORCH_CPU_INDEX"; else extra=""; fi \
 && pip install $extra -r requirements.txt

COPY README.md ./
COPY tensorgate ./tensorgate
COPY server ./server
COPY backends ./backends
COPY clients ./clients
COPY protos ./protos
RUN pip install --no-deps . && pip check

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
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TENSORGATE_IMAGE_FLAVOR=$FLAVOR
USER 10001:10001
WORKDIR /home/tensorgate

# gRPC (inference, health, reflection) and Prometheus /metrics.
EXPOSE 8001 8002

# grpc.health.v1 Check on the whole server: SERVING once the models are loaded, NOT_SERVING
# while draining. Loading TensorFlow models can take a minute: hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["tensorgate", "health", "--url", "127.0.0.1:8001", "--timeout", "3"]

# Exec form: tini is PID 1 and forwards SIGTERM to the server, which drains (health
# NOT_SERVING, accepted calls finish within --drain-timeout) and exits 0. `docker stop`
# waits 10 s by default: give it --time 35 for the default 30 s drain.
ENTRYPOINT ["/usr/bin/tini", "--", "tensorgate"]
CMD ["serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]
