#!/usr/bin/env bash
# The bundled load test. Builds stockd and the load test in release mode, starts stockd on
# a free loopback port with a fresh temporary data directory, runs the ceiling phase and
# then SCENARIO, verifies the result against the server's own state, prints the report,
# stops the server, and exits non-zero if verification failed.
#
#   loadtest/run.sh SCENARIO [--duration SECONDS] [--connections N] [--json FILE]
#                            [--markdown FILE] [--durability sync|async] [--stock S]
#                            [--requests N] [--rounds R]
#
# SCENARIO: ceiling | flash-sale | checkout | crash   (loadtest --help lists every flag)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
cargo build --release --quiet -p stockd -p loadtest
exec ./target/release/loadtest "$@" --stockd ./target/release/stockd
