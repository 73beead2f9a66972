#!/usr/bin/env bash
# Install tensorgate with every framework and serve the built-in demo repository
# (generated on first use, no downloads) on gRPC :8001 and metrics :8002.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tensorgate serve "$@"
