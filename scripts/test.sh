#!/usr/bin/env bash
# Install everything the tests need, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the layers declared in pyproject.toml
.venv/bin/python protos/generate.py --check
if [ -f native/Cargo.toml ]; then  # the native front end's crate: format, lints, its own tests
  (cd native && cargo fmt --check && cargo clippy --quiet --all-targets -- -D warnings \
     && cargo test --quiet)
fi
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
