#!/usr/bin/env bash
# How long the README's two commands take the first time: a fresh clone of this checkout
# (committed state), with empty pip, cargo, Go and demo caches (crates, wheels and modules
# are downloaded again). Prints the seconds until `bash scripts/demo.sh` serves, then the
# installs that `bash scripts/setup.sh --test` adds (ghz, tritonclient's venv).
#   bash loadtest/first_run.sh | tee loadtest/results/first-run-<date>.txt
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
rm -rf /tmp/fresh /tmp/fresh-pip /tmp/fresh-cargo /tmp/fresh-xdg /tmp/fresh-tools /tmp/fresh-gomod /tmp/fresh-gocache; mkdir -p /tmp/fresh-cargo
git clone -q "$src" /tmp/fresh && cd /tmp/fresh
cp -r ~/.cargo/bin /tmp/fresh-cargo/ 2>/dev/null
export PIP_CACHE_DIR=/tmp/fresh-pip CARGO_HOME=/tmp/fresh-cargo XDG_CACHE_HOME=/tmp/fresh-xdg TENSORGATE_TOOLS=/tmp/fresh-tools GOMODCACHE=/tmp/fresh-gomod GOCACHE=/tmp/fresh-gocache
start=$(date +%s)
bash scripts/demo.sh --port 0 --metrics-port 0 --port-file /tmp/fresh/ports.json > /tmp/fresh-demo.log 2>&1 &
pid=$!
while [ ! -f /tmp/fresh/ports.json ]; do
  if ! kill -0 $pid 2>/dev/null; then echo "demo exited early"; tail -20 /tmp/fresh-demo.log; exit 1; fi
  sleep 2
done
echo "demo serving after $(( $(date +%s) - start )) s"
grep -m1 "front end: " /tmp/fresh-demo.log
kill -TERM $pid; wait $pid
echo "machine: $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1 /proc/loadavg)"
start2=$(date +%s)
bash scripts/setup.sh --test > /tmp/fresh-setup-test.log 2>&1
echo "test extras (setup.sh --test after the demo) $(( $(date +%s) - start2 )) s"
