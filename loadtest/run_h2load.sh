#!/usr/bin/env bash
# run_h2load.sh -- send one ModelInferRequest (the JSON files in loadtest/data/) to a gateway with h2load,
# for users without ghz: the same request ghz would send, pre-framed as a gRPC body.
#
#   loadtest/run_h2load.sh [-f loadtest/data/scorer.json] [--url 127.0.0.1:8001] [-c 32] [-D 10 | -n 20000]
#                          [--model NAME] [--version V] [--warmup 2] [-- EXTRA_H2LOAD_ARGS...]
#
# h2load opens -c HTTP/2 connections with one stream each (a closed loop, like ghz -c with as many
# connections). It counts a gRPC error as a success (an error is HTTP 200 with grpc-status in the trailers),
# so this script first sends the request once through a real gRPC client and stops unless it answers OK, and
# calls once more after the run. Needs h2load (Debian: apt-get install nghttp2-client) and the project's
# Python (.venv, or $PYTHON). Run from anywhere; paths are relative to the repository root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
FILE=$ROOT/loadtest/data/scorer.json; URL=127.0.0.1:8001; C=32; D=10; N=; MODEL=; VERSION=; WARMUP=2
while [ $# -gt 0 ]; do
  case $1 in
    -f|--file) FILE=$2; shift 2 ;;
    --url) URL=$2; shift 2 ;;
    -c) C=$2; shift 2 ;;
    -D) D=$2; shift 2 ;;
    -n) N=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v h2load > /dev/null || { echo "h2load not found: apt-get install nghttp2-client" >&2; exit 1; }
BODY=$(mktemp --suffix=.grpc)
trap 'rm -f "$BODY"' EXIT
"$PY" "$ROOT/loadtest/make_requests.py" --body "$FILE" "$BODY" ${MODEL:+--model "$MODEL"} \
    ${VERSION:+--version "$VERSION"}

probe() {  # one call with the exact bytes h2load sends; prints the reply's size, fails unless OK
  "$PY" - "$URL" "$BODY" <<'P'
import sys, grpc
url, body = sys.argv[1], open(sys.argv[2], "rb").read()[5:]  # strip the 5-byte gRPC frame header
with grpc.insecure_channel(url) as ch:
    call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    try:
        reply = call(body, timeout=30)
    except grpc.RpcError as e:
        sys.exit(f"the request fails: {e.code().name}: {e.details()}")
print(f"probe OK: {len(reply)} reply bytes")
P
}
probe
METHOD=inference.GRPCInferenceService/ModelInfer
if [ -n "$N" ]; then LOAD=(-n "$N"); else LOAD=(-D "$D" --warm-up-time="$WARMUP"); fi
h2load -t 1 -c "$C" -m 1 "${LOAD[@]}" -d "$BODY" -H 'content-type: application/grpc' -H 'te: trailers' \
    "$@" "http://$URL/$METHOD"
probe
