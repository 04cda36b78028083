#!/usr/bin/env bash
# What checking API keys adds to a reserve's server CPU: two servers of the same build, one
# running open (no key: loopback, the embedded default) and one with keys (an admin key
# configured, requests carrying a `reserve` key created over HTTP), driven in turn with the
# same client at the same fixed rate: POST /v1/reservations (one unit of a product
# stocked for the whole run), alternated open, keyed, open, keyed... Prints each phase's
# server CPU per request and the mean ratio keyed / open.
#
#   loadtest/tools/auth-cpu.sh STOCKD [sync|async] [RATE] [ROUNDS]
#
# Needs `h2load` (Debian: nghttp2-client) and `perf` (Debian: linux-perf), like
# fixed-rate-cpu.sh, whose phases these are: 6 s per phase at RATE requests/s (default
# 4000; 16 connections), 4 s of the server's task-clock sampled inside each. Stops both
# servers (also on failure or Ctrl-C).
set -euo pipefail
stockd=${1:?STOCKD binary}; durability=${2:-sync}; rate=${3:-4000}; rounds=${4:-3}
clients=16
for tool in h2load perf curl; do
  command -v "$tool" > /dev/null || { echo "needs $tool" >&2; exit 2; }
done
work=$(mktemp -d)
open= keyed=
cleanup() {
  for pid in $open $keyed; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
admin=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
start() { # NAME [ENV...]: starts a server in the background (its pid is then $!)
  local name=$1; shift
  env -u STOCKD_ADMIN_KEY -u STOCKD_ADMIN_KEY_FILE "$@" RUST_LOG=warn "$stockd" serve \
    --listen 127.0.0.1:0 --data-dir "$work/$name/data" --snapshot-dir "$work/$name/snaps" \
    --durability "$durability" > "$work/$name.out" 2> "$work/$name.err" &
}
start open; open=$!
start keyed STOCKD_ADMIN_KEY="$admin"; keyed=$!
address() {
  for _ in $(seq 200); do grep -q "listening on" "$work/$1.out" && break; sleep 0.05; done
  grep -o "listening on [0-9.:]*" "$work/$1.out" | awk '{print $3}'
}
open_addr=$(address open); keyed_addr=$(address keyed)
[ -n "$open_addr" ] && [ -n "$keyed_addr" ] || { echo "stockd did not start" >&2; cat "$work"/*.err >&2; exit 1; }
product='{"sku":"HOT","name":"hot","on_hand":1000000000}'
curl -sf -X POST "http://$open_addr/v1/products" -H 'Content-Type: application/json' -d "$product" > /dev/null
curl -sf -X POST "http://$keyed_addr/v1/products" -H 'Content-Type: application/json' \
  -H "Authorization: Bearer $admin" -d "$product" > /dev/null
secret=$(curl -sf -X POST "http://$keyed_addr/v1/admin/keys" -H 'Content-Type: application/json' \
  -H "Authorization: Bearer $admin" -d '{"name":"checkout","scopes":["reserve"]}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["secret"])')
printf '{"customer_id":"c","items":[{"sku":"HOT","quantity":1}],"ttl_seconds":3600}' > "$work/body"

phase() { # open|keyed: drive that server's reserves at the rate, sample its CPU; prints µs/request
  local args=(--h1 -c "$clients" --rps=$((rate / clients)) -D 6 -d "$work/body"
              -H 'Content-Type: application/json') pid addr
  if [ "$1" = keyed ]; then
    args+=(-H "Authorization: Bearer $secret"); pid=$keyed; addr=$keyed_addr
  else
    pid=$open; addr=$open_addr
  fi
  h2load "${args[@]}" "http://$addr/v1/reservations" > "$work/h2load.out" 2>&1 &
  local client=$!
  sleep 1
  LC_ALL=C perf stat -x, -e task-clock -p "$pid" -o "$work/perf" -- sleep 4
  wait "$client"
  local done ok ms
  done=$(awk '/^requests:/ {print $2}' "$work/h2load.out")
  ok=$(awk '/^status codes:/ {print $3}' "$work/h2load.out")
  ms=$(awk -F, '/task-clock/ {print $1}' "$work/perf")
  awk -v ms="$ms" -v rate="$rate" -v name="$1" -v done="$done" -v ok="$ok" 'BEGIN {
    us = ms * 1000 / (rate * 4)
    printf "%-6s reserve %6.1f us/request  (%s of %s answered 2xx over 6 s)\n", name, us, ok, done > "/dev/stderr"
    print us
  }'
}
open_sum=0 keyed_sum=0
for round in $(seq "$rounds"); do
  # Each goes first in every other round, so a drift of the machine favours neither.
  if [ $((round % 2)) = 1 ]; then o=$(phase open); k=$(phase keyed)
  else k=$(phase keyed); o=$(phase open); fi
  open_sum=$(awk -v a="$open_sum" -v b="$o" 'BEGIN {print a + b}')
  keyed_sum=$(awk -v a="$keyed_sum" -v b="$k" 'BEGIN {print a + b}')
done
awk -v o="$open_sum" -v k="$keyed_sum" -v n="$rounds" -v d="$durability" -v rate="$rate" 'BEGIN {
  printf "%s at %d req/s: reserve open %.1f us, with a key %.1f us per request; keyed / open = %.3f\n",
    d, rate, o / n, k / n, k / o
}'
