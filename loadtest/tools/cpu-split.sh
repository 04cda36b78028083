#!/usr/bin/env bash
# CPU per request of the server and of the load generator, in the ceiling phase and in the
# scenario phase of one run (needs `perf`). While the two cores are saturated, the ratio
# the load test reports is about (server + client CPU per /health) / (server + client CPU
# per scenario request), so this shows which side a change has to shrink.
#
#   loadtest/tools/cpu-split.sh STOCKD LOADTEST [sync|async] [flash-sale|checkout]
#
# Starts STOCKD on a free loopback port with a fresh data directory, runs LOADTEST against
# it (--rounds 1: a ceiling phase, the scenario, a ceiling phase again, 8 s each, 256
# connections), takes 5 s of `perf stat -e task-clock` on both processes inside the first
# two phases, and stops both processes (also on failure or Ctrl-C).
set -euo pipefail
stockd=${1:?STOCKD binary}; loadtest=${2:?LOADTEST binary}; durability=${3:-sync}
scenario=${4:-flash-sale}
work=$(mktemp -d)
server= client=
cleanup() {
  for pid in $client $server; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$stockd" serve --listen 127.0.0.1:0 --data-dir "$work/data" --snapshot-dir "$work/snaps" \
  --durability "$durability" > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 200); do grep -q "listening on" "$work/server.log" && break; sleep 0.05; done
addr=$(grep -o "listening on [0-9.:]*" "$work/server.log" | awk '{print $3}')
"$loadtest" "$scenario" --target "http://$addr" --duration 8 --rounds 1 --connections 256 \
  --stock 100000000 --json "$work/report.json" > "$work/loadtest.out" 2>&1 &
client=$!
sample() { # PHASE: 5 s of task-clock on both processes at once
  LC_ALL=C perf stat -x, -e task-clock -p "$server" -o "$work/server-$1" -- sleep 5 &
  local s=$!
  LC_ALL=C perf stat -x, -e task-clock -p "$client" -o "$work/client-$1" -- sleep 5
  wait "$s"
}
sleep 1.5; sample ceiling
sleep 3.5; sample scenario
if ! wait "$client"; then
  client=
  echo "cpu-split: the load test failed:" >&2
  cat "$work/loadtest.out" >&2
  exit 1
fi
client=
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
r = json.load(open(f"{work}/report.json"))
def ms(name):
    for line in open(f"{work}/{name}"):
        if "task-clock" in line:
            return float(line.split(",")[0])
# The first ceiling phase (the one sampled), not the mean of both.
for phase, rps in (("ceiling", r["ceilings_rps"][0]), ("scenario", r["throughput_rps"])):
    s, c = ms(f"server-{phase}"), ms(f"client-{phase}")
    n = rps * 5
    print(f"{phase:8s} {rps:8.0f} req/s  server {s*1000/n:5.1f} us  client {c*1000/n:5.1f} us"
          f"  total {(s+c)*1000/n:5.1f} us per request")
print(f"ratio {r['ratio']:.2f}  verified {r['verified']}")
PY
