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
# torch==2.13.0 is pinned in pyproject.toml (an open range downloads a newer release). From
# PyPI it is the CUDA build (~3 GB with its nvidia packages); it runs on the CPU.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
# The CUDA build pulls in `triton` (torch's GPU kernel compiler). Importing it in a process
# that already loaded TensorFlow crashes that process (segfault in libtriton's LLVM), and a
# gateway loads both when a model has tf and pt2 variants. On a machine without an NVIDIA
# GPU nothing uses it (inductor compiles CPU kernels in C++), so it is removed there.
if ! command -v nvidia-smi >/dev/null 2>&1 && .venv/bin/python -m pip show -q triton 2>/dev/null; then
  .venv/bin/python -m pip uninstall -q -y triton
fi

# The native front end (native/: Rust, built by maturin into the `tensorgate_native`
# extension). Rebuilt only when its sources or the protos change; without cargo the gateway
# still runs, on the python front end.
if [ -f native/Cargo.toml ]; then
  if command -v cargo >/dev/null 2>&1; then
    stamp=.venv/.tensorgate-native.sha256
    sum=$({ cat native/Cargo.toml native/Cargo.lock native/build.rs native/pyproject.toml \
              protos/*.proto $(find native/src -type f | sort) 2>/dev/null || true; } \
          | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ] \
       || ! .venv/bin/python -c 'import tensorgate_native' 2>/dev/null; then
      echo "building the native front end (cargo, release; the first build takes a few minutes)" >&2
      .venv/bin/python -m pip install -q --disable-pip-version-check ./native
      echo "$sum" > "$stamp"
    fi
  else
    echo "cargo not found: the native front end is not built (tensorgate serve runs on" \
         "--front-end python). Install Rust (https://rustup.rs) and run this again." >&2
  fi
fi

if [ "$extras" = dev ]; then
  # tritonclient pins protobuf < 7 and registers its own `inference` protos: it lives in
  # its own venv and the tests run it in a subprocess.
  if [ ! -x .venv-triton/bin/python ]; then
    "$PY" -m venv .venv-triton
  fi
  .venv-triton/bin/python -m pip install -q --disable-pip-version-check \
    'tritonclient[grpc]==2.73.0' numpy
  # ghz, for tests/test_ghz.py: built with `go install` into a tools folder outside the tree.
  if [ -f scripts/install_ghz.sh ]; then
    bash scripts/install_ghz.sh >/dev/null
  fi
fi
