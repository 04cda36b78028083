#!/usr/bin/env bash
# What one webhook endpoint costs a flash sale: the flash-sale load test against one stockd
# (--events on), alternately without and with a webhook endpoint attached (a loopback
# receiver, `webhook-sink`, that answers 204 at once), ROUNDS pairs in one run, so that a
# machine whose speed drifts biases neither side. The endpoint is registered before each
# "with" run (it starts at the feed's end, so it gets that run's events) and deleted after
# it. Prints one line per run and the ratio of the mean throughputs (with / without); each
# run's own ceiling ratio is in its JSON, kept in the work directory if KEEP=1.
#
#   loadtest/tools/webhook-cost.sh [ROUNDS] [DURATION] [CONNECTIONS]
#
# Builds stockd, loadtest and webhook-sink in release mode (CARGO_TARGET_DIR honoured).
# Needs curl and python3. Each run is `loadtest flash-sale --rounds 1` (C S C: three
# phases of DURATION seconds, default 10).
set -euo pipefail
rounds=${1:-3}; duration=${2:-10}; connections=${3:-256}
cd "$(dirname "$0")/../.."
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || target_dir=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet -p stockd -p loadtest --bins
bin=$target_dir/release
work=$(mktemp -d)
server=; sink=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  [ -n "$sink" ] && kill "$sink" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
wait_listening() { # FILE → ADDR
  for _ in $(seq 1 300); do
    addr=$(sed -n 's/^listening on //p' "$1")
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "no 'listening on' in $1" >&2; exit 2
}
RUST_LOG=warn "$bin/stockd" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  --snapshot-dir "$work/snaps" --events on > "$work/server.out" 2> "$work/server.err" &
server=$!
"$bin/webhook-sink" 127.0.0.1:0 > "$work/sink.out" &
sink=$!
base="http://$(wait_listening "$work/server.out")"
hook_url="http://$(wait_listening "$work/sink.out")/hooks"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
for round in $(seq 1 "$rounds"); do
  for mode in without with; do
    id=
    if [ "$mode" = with ]; then
      id=$(curl -sf -X POST "$base/v1/webhooks" -H 'Content-Type: application/json' \
        -d "{\"url\":\"$hook_url\"}" | json '["id"]')
    fi
    out="$work/$mode-$round.json"
    "$bin/loadtest" flash-sale --target "$base" --rounds 1 --duration "$duration" \
      --connections "$connections" --json "$out" > /dev/null
    extra=
    if [ -n "$id" ]; then
      view=$(curl -sf "$base/v1/webhooks/$id")
      extra="deliveries $(echo "$view" | json '["deliveries"]') lag_records $(echo "$view" | json '["lag_records"]') failures $(echo "$view" | json '["failures"]')"
      curl -sf -X DELETE "$base/v1/webhooks/$id" > /dev/null
    fi
    echo "round $round $mode: $(json '["throughput_rps"]' < "$out" | cut -d. -f1) req/s," \
      "ceiling ratio $(json '["ratio"]' < "$out"), verified $(json '["verified"]' < "$out") $extra"
  done
done
python3 - "$work" "$rounds" <<'PY'
import json, sys
work, rounds = sys.argv[1], int(sys.argv[2])
get = lambda mode, r: json.load(open(f"{work}/{mode}-{r}.json"))
w = [get("with", r)["throughput_rps"] for r in range(1, rounds + 1)]
o = [get("without", r)["throughput_rps"] for r in range(1, rounds + 1)]
pairs = [a / b for a, b in zip(w, o)]
print("pair ratios (with / without):", " ".join(f"{p:.3f}" for p in pairs))
print(f"mean throughput without {sum(o)/len(o):.0f} req/s, with {sum(w)/len(w):.0f} req/s, "
      f"ratio {sum(w)/sum(o):.3f}")
PY
