#!/usr/bin/env bash
# Install ghz (the gRPC load generator the tests and loadtest/ghz/ use) with `go install`
# into a tools folder outside the source tree, once: nothing happens when the pinned
# version is already there. Prints the binary's path on its last line.
#
#   bash scripts/install_ghz.sh            # -> ~/.cache/tensorgate/tools/bin/ghz
#   TENSORGATE_TOOLS=/opt/tg bash scripts/install_ghz.sh
#
# The tests find ghz through $TENSORGATE_GHZ, else this folder, else PATH.
set -euo pipefail

GHZ_VERSION=v0.120.0
TOOLS=${TENSORGATE_TOOLS:-$HOME/.cache/tensorgate/tools}
BIN="$TOOLS/bin/ghz"

if ! command -v go >/dev/null 2>&1; then
  cat >&2 <<EOF
install_ghz.sh: 'go' is not on PATH; ghz $GHZ_VERSION is built with 'go install'.
Install Go 1.18 or newer (Debian/Ubuntu: apt-get install -y golang-go; or a release from
the Go project's downloads page, with its bin folder on PATH), then run again:
  bash scripts/install_ghz.sh
EOF
  exit 1
fi

installed_version() {
  # `go version -m` reads the module version that `go install` stamped into the binary.
  go version -m "$BIN" 2>/dev/null | awk '$1 == "mod" && $2 == "github.com/bojand/ghz" {print $3}'
}

if [ -x "$BIN" ] && [ "$(installed_version)" = "$GHZ_VERSION" ]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$TOOLS/bin"
echo "install_ghz.sh: building ghz $GHZ_VERSION with $(go version | cut -d' ' -f3)" \
  "into $TOOLS/bin (a few minutes on 2 cores)" >&2
GOBIN="$TOOLS/bin" GOFLAGS="${GOFLAGS:-} -trimpath" \
  go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"

if [ "$(installed_version)" != "$GHZ_VERSION" ]; then
  echo "install_ghz.sh: $BIN is not ghz $GHZ_VERSION after go install" >&2
  exit 1
fi
echo "$BIN"
