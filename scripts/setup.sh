#!/usr/bin/env bash
# Create .venv with tensorgate and every framework (and, with --test, the test tools and
# the separate tritonclient venv the interoperability tests run in). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=all
[ "${1:-}" = "--test" ] && extras=dev

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: it is the CPU build; any other version or an
# open range pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"

if [ "$extras" = dev ]; then
  # tritonclient pins protobuf < 7 and registers its own `inference` protos: it lives in
  # its own venv and the tests run it in a subprocess.
  if [ ! -x .venv-triton/bin/python ]; then
    "$PY" -m venv .venv-triton
  fi
  .venv-triton/bin/python -m pip install -q --disable-pip-version-check \
    'tritonclient[grpc]==2.73.0' numpy
fi
