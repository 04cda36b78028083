#!/usr/bin/env bash
# The bundled load test. Builds stockd and the load test in release mode (where cargo puts
# them: CARGO_TARGET_DIR is honoured), starts stockd on a free loopback port with a fresh
# temporary data directory, runs SCENARIO in rounds between ceiling phases (C S C S C S C
# with --rounds 3: --duration 10 takes about 23 s, each phase a third of it), verifies the
# result against the server's own state, prints the report, stops the server, and exits
# non-zero if verification failed.
#
#   loadtest/run.sh SCENARIO [--duration SECONDS] [--connections N] [--rounds R]
#                            [--durability sync|async] [--stock S] [--requests N]
#                            [--rate R] [--target URL] [--json FILE] [--markdown FILE]
#                            [--svg FILE]
#
# SCENARIO: ceiling | flash-sale | limits | checkout | crash | failover | cluster
#           (loadtest --help lists every flag; failover and cluster start a 3-node cluster
#           of their own, so they take no --target)
# --target URL loads a server already running on loopback instead of starting one.
# Relative FILE paths are taken from the directory the script is run in.
set -euo pipefail
if [ $# -lt 1 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
# The report files, relative to where the script was run (it works from the repository).
args=()
spawn=1
while [ $# -gt 0 ]; do
  case "$1" in
    --json|--markdown|--svg)
      args+=("$1")
      shift
      if [ $# -gt 0 ]; then
        case "$1" in /*) args+=("$1") ;; *) args+=("$PWD/$1") ;; esac
        shift
      fi
      ;;
    --json=*|--markdown=*|--svg=*)
      flag=${1%%=*}
      file=${1#*=}
      case "$file" in /*) ;; *) file="$PWD/$file" ;; esac
      args+=("$flag=$file")
      shift
      ;;
    --target|--target=*)
      spawn=0
      args+=("$1")
      shift
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
cd "$(dirname "$0")/.."
# Where cargo puts the binaries: target/ unless CARGO_TARGET_DIR (or a cargo config) says
# otherwise.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || target_dir=${CARGO_TARGET_DIR:-target}
echo "loadtest/run.sh: building stockd and loadtest in release mode into $target_dir" \
  "(the first build takes a few minutes)" >&2
cargo build --release -p stockd -p loadtest
if [ "$spawn" = 1 ]; then
  exec "$target_dir/release/loadtest" "${args[@]}" --stockd "$target_dir/release/stockd"
else
  exec "$target_dir/release/loadtest" "${args[@]}"
fi
