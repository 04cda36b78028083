#!/usr/bin/env bash
# Quick measurement with wrk (Debian package `wrk`), a cross-check of the bundled load
# test's client (loadtest/run.sh): builds and starts a release stockd on a free loopback
# port with a fresh data dir, measures the HTTP ceiling (GET /health) and
# POST /v1/reservations on one hot SKU in the same run, prints both and their ratio, stops
# the server.
# Usage: loadtest/quick-wrk.sh [DURATION_SECONDS] [CONNECTIONS] [sync|async]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
conns=${2:-256}
durability=${3:-sync}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }
# Where cargo puts the binary: target/ unless CARGO_TARGET_DIR (or a cargo config) says
# otherwise.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || target_dir=${CARGO_TARGET_DIR:-target}
echo "quick-wrk.sh: building stockd in release mode into $target_dir" \
  "(the first build takes a few minutes)" >&2
cargo build --release -p stockd
work=$(mktemp -d)
out="$work/stdout"
"$target_dir/release/stockd" --listen 127.0.0.1:0 --data-dir "$work/data" \
  --snapshot-dir "$work/snapshots" --durability "$durability" >"$out" 2>"$work/stderr" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q '^listening on ' "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$out")
curl -fsS -X POST "http://$addr/v1/products" -H 'Content-Type: application/json' \
  -d '{"sku":"HOT","name":"Hot item","on_hand":1000000000000}' >/dev/null
cat >"$work/reserve.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"customer_id":"bench","items":[{"sku":"HOT","quantity":1}],"ttl_seconds":86400}'
wrk.headers["Content-Type"] = "application/json"
LUA
threads=2
echo "== ceiling: GET /health, $conns connections, ${duration}s"
ceiling=$(wrk -t$threads -c"$conns" -d"${duration}s" --latency "http://$addr/health" | tee /dev/stderr | awk '/Requests\/sec/ {print $2}')
echo "== reserve: POST /v1/reservations ($durability), $conns connections, ${duration}s"
reserve=$(wrk -t$threads -c"$conns" -d"${duration}s" --latency -s "$work/reserve.lua" "http://$addr/v1/reservations" | tee /dev/stderr | awk '/Requests\/sec/ {print $2}')
held=$(curl -fsS "http://$addr/v1/products/HOT" | sed -E 's/.*"reserved":([0-9]+).*/\1/')
echo "ceiling_rps=$ceiling reserve_rps=$reserve ratio=$(awk -v a="$reserve" -v b="$ceiling" 'BEGIN{printf "%.2f", a/b}') reserved_units=$held"
