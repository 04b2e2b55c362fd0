#!/usr/bin/env bash
# Runs the benchmark comparisons of the README's "Benchmarking" section, side by side in one run:
# server pinned to core 0 (optionally capped at 40% of it by a cgroup CPU quota), load generator
# on core 1, alternating servers, median of 3 rounds. Needs root for the cgroup, Debian's wrk and
# nginx for the HTTP part, and gcc for the C reference loops in ../shared/reference.
#
#   benches/run-all.sh [echo|idle|http|ws|trigger|sweep|connect|all]   (default: all)
#
# Results (tables and JSON) go to bench-out/. Every run is bounded: about 15 minutes for `all`.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=bench-out
mkdir -p "$out" target/reference
cargo build --release --bin shardnet --examples >/dev/null
for c in limit-echo limit-http; do
  [ -x target/reference/$c ] || gcc -O2 -o target/reference/$c ../shared/reference/$c.c
done
B=target/release/shardnet
EX=target/release/examples
common=(--server-cores 0 --client-cores 1 --rounds 3 --warmup 1s --duration 4s)

run() { # name, args...
  local name=$1; shift
  echo "== $name" | tee -a "$out/summary.txt"
  "$B" bench "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" | sed -n '/^median/,$p' | tee -a "$out/summary.txt"
}

if [[ $what == echo || $what == all ]]; then
  for quota in 40 none; do
    q=(); [[ $quota == none ]] || q=(--server-quota "$quota")
    for load in "50 1" "50 16" "1000 1"; do
      set -- $load
      run "echo-c$1-d$2-q$quota" --spawn --mode echo -c "$1" -d "$2" -s 64 "${common[@]}" "${q[@]}" \
        --compare "$PWD/target/reference/limit-echo --port {port}" --compare-name C-limit-echo \
        --compare "$PWD/$EX/tokio-echo --port {port}" --compare-name tokio-echo
    done
  done
fi

if [[ $what == trigger || $what == all ]]; then
  for t in edge level edge level edge level; do
    echo "== trigger $t" | tee -a "$out/summary.txt"
    "$B" bench --spawn --trigger "$t" --mode echo -c 50 -d 16 --server-quota 40 --server-cores 0 --client-cores 1 \
      --warmup 1s --duration 4s 2>&1 | grep -E '^shardnet' | tee -a "$out/summary.txt"
  done
fi

if [[ $what == idle || $what == all ]]; then
  run idle-15000 --spawn --mode idle -c 15000 --warmup 1s --duration 5s --rounds 1
  run idle-ws-15000 --spawn --mode idle --idle-ws -c 15000 --warmup 1s --duration 5s --rounds 1
fi
