#!/usr/bin/env bash
# RSS of one gateway process under plain load: `tensorgate serve` (FRONT_END, default native)
# on the peers' MLP, then ROUNDS rounds of N ModelInfer calls each with h2load (c=32), the
# server's RSS printed before and after every round. Fails if any call fails.
#   bash loadtest/rss_flat.sh [ROUNDS=4] [N=50000] | tee loadtest/results/rss-flat-<date>.txt
# Needs h2load (Debian nghttp2-client) and $PEERS_HOME/models (../shared/peers/setup_models.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}; N=${2:-50000}; FRONT_END=${FRONT_END:-native}
PEERS_HOME=${PEERS_HOME:-$HOME/peers}
work=$(mktemp -d); trap 'kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/models/mlp/1"
cp "$PEERS_HOME/models/mlp.onnx" "$work/models/mlp/1/model.onnx"
.venv/bin/tensorgate serve --repository "$work/models" --port 0 --metrics-port -1 \
    --port-file "$work/ports.json" --front-end "$FRONT_END" --log-level WARNING &
pid=$!
while [ ! -f "$work/ports.json" ]; do sleep 0.2; done
port=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['grpc_port'])" "$work/ports.json")
rss() { awk '/VmRSS/ {print $2 / 1024 " MiB"}' "/proc/$pid/status"; }
echo "front end: $FRONT_END, $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "rss before load: $(rss)"
for r in $(seq "$ROUNDS"); do
  out=$(h2load -n "$N" -c 32 -m 1 --data "$PEERS_HOME/models/kserve_infer.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/inference.GRPCInferenceService/ModelInfer")
  ok=$(echo "$out" | awk '/^requests:/ {print $8}')
  echo "round $r: $N calls, $ok succeeded (HTTP), rss $(rss)"
  echo "$out" | grep -q "$N succeeded" || { echo "$out"; exit 1; }
done
# HTTP 200 is not gRPC OK: the server's own count of successful inferences must be all of them.
.venv/bin/python - "127.0.0.1:$port" "$((ROUNDS * N))" <<'PY'
import sys
from tensorgate.clients import Client
with Client(sys.argv[1]) as client:
    stats = client.model_statistics("mlp")
ok = sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats)
print(f"server: {ok} successful inferences of {sys.argv[2]}")
sys.exit(0 if ok == int(sys.argv[2]) else 1)
PY
