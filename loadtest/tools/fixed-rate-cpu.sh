#!/usr/bin/env bash
# Server CPU per request at one fixed arrival rate: GET /health against POST
# /v1/reservations (one unit of a product stocked for the whole run), alternated, with the
# same client at the same rate, so the ratio is the server's own cost of a reserve in
# units of its cost of the cheapest request. The closed-loop load test cannot give this:
# there the client's CPU bounds the ratio on a 2-core machine.
#
#   loadtest/tools/fixed-rate-cpu.sh STOCKD [sync|async] [RATE] [ROUNDS]
#
# Needs `h2load` (Debian: nghttp2-client) for the fixed rate and `perf` (Debian:
# linux-perf) for the CPU. Starts STOCKD on a free loopback port with a fresh data
# directory, drives each endpoint for 6 s per phase at RATE requests/s (default 4000; 16
# connections), samples 4 s of the server's task-clock inside each phase, prints one line
# per phase and the mean ratio, and stops the server (also on failure or Ctrl-C).
set -euo pipefail
stockd=${1:?STOCKD binary}; durability=${2:-sync}; rate=${3:-4000}; rounds=${4:-3}
clients=16
for tool in h2load perf; do
  command -v "$tool" > /dev/null || { echo "needs $tool" >&2; exit 2; }
done
work=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
RUST_LOG=warn "$stockd" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  --snapshot-dir "$work/snaps" --durability "$durability" > "$work/server.out" 2> "$work/server.err" &
server=$!
for _ in $(seq 200); do grep -q "listening on" "$work/server.out" && break; sleep 0.05; done
addr=$(grep -o "listening on [0-9.:]*" "$work/server.out" | awk '{print $3}')
[ -n "$addr" ] || { echo "stockd did not start" >&2; cat "$work/server.err" >&2; exit 1; }
curl -sf -X POST "http://$addr/v1/products" -H 'Content-Type: application/json' \
  -d '{"sku":"HOT","name":"hot","on_hand":1000000000}' > /dev/null
printf '{"customer_id":"c","items":[{"sku":"HOT","quantity":1}],"ttl_seconds":3600}' > "$work/body"

phase() { # NAME: drive one endpoint at the rate, sample the server's CPU; prints µs/request
  local args=(--h1 -c "$clients" --rps=$((rate / clients)) -D 6)
  if [ "$1" = reserve ]; then
    args+=(-d "$work/body" -H 'Content-Type: application/json' "http://$addr/v1/reservations")
  else
    args+=("http://$addr/health")
  fi
  h2load "${args[@]}" > "$work/h2load.out" 2>&1 &
  local client=$!
  sleep 1
  LC_ALL=C perf stat -x, -e task-clock -p "$server" -o "$work/perf" -- sleep 4
  wait "$client"
  local done ms
  done=$(awk '/^requests:/ {print $2}' "$work/h2load.out")
  local ok; ok=$(awk '/^status codes:/ {print $3}' "$work/h2load.out")
  ms=$(awk -F, '/task-clock/ {print $1}' "$work/perf")
  # Requests in the 4 s sample: the rate, if the server kept it (checked below).
  awk -v ms="$ms" -v rate="$rate" -v name="$1" -v done="$done" -v ok="$ok" 'BEGIN {
    us = ms * 1000 / (rate * 4)
    printf "%-8s %6.1f us/request  (%s of %s answered 2xx over 6 s)\n", name, us, ok, done > "/dev/stderr"
    print us
  }'
}
health_sum=0 reserve_sum=0
for round in $(seq "$rounds"); do
  h=$(phase health); r=$(phase reserve)
  health_sum=$(awk -v a="$health_sum" -v b="$h" 'BEGIN {print a + b}')
  reserve_sum=$(awk -v a="$reserve_sum" -v b="$r" 'BEGIN {print a + b}')
done
awk -v h="$health_sum" -v r="$reserve_sum" -v n="$rounds" -v d="$durability" -v rate="$rate" 'BEGIN {
  printf "%s at %d req/s: health %.1f us, reserve %.1f us per request; reserve / health = %.2f\n",
    d, rate, h / n, r / n, r / h
}'
