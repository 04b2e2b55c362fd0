#!/usr/bin/env bash
# Runs the benchmark comparisons of the README's "Benchmarking" section, side by side in one run:
# server pinned to core 0 (optionally capped at 40% of it by a cgroup CPU quota), load generator
# on core 1, alternating servers, median of 3 rounds. Needs root for the cgroup, Debian's wrk and
# nginx for the HTTP part, and gcc for the C reference loops in ../shared/reference.
#
#   [ROUNDS=5] benches/run-all.sh [SECTION ...]   sections: echo trigger idle http ws fanout connect sweep all (default: all)
#
# Results (tables and JSON) go to bench-out/, the medians to bench-out/summary.txt. Every run is
# bounded: about 25 minutes for `all`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 1 ]; then # several sections: one after another
  for w in "$@"; do bash benches/run-all.sh "$w"; done
  exit 0
fi
what=${1:-all}
out=bench-out
mkdir -p "$out" target/reference
cargo build --release --bin shardnet --examples >/dev/null
for c in limit-echo limit-http; do
  [ -x target/reference/$c ] || gcc -O2 -o target/reference/$c ../shared/reference/$c.c
done
B=target/release/shardnet
EX=target/release/examples
common=(--server-cores 0 --client-cores 1 --rounds "${ROUNDS:-3}" --warmup 1s --duration 4s)

run() { # name, args...
  local name=$1; shift
  echo "== $name" | tee -a "$out/summary.txt" || true
  "$B" bench "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" | sed -n '/^median/,$p' | tee -a "$out/summary.txt" || true
}
single() { # name, args...: one run (no --compare); its table goes to the summary
  local name=$1; shift
  echo "== $name" | tee -a "$out/summary.txt" || true
  "$B" bench "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" | sed -n '/^server /,$p' | tee -a "$out/summary.txt" || true
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
    echo "== trigger $t" | tee -a "$out/summary.txt" || true
    "$B" bench --spawn --trigger "$t" --mode echo -c 50 -d 16 --server-quota 40 --server-cores 0 --client-cores 1 \
      --warmup 1s --duration 4s 2>&1 | grep -E '^shardnet' | tee -a "$out/summary.txt" || true
  done
fi

if [[ $what == idle || $what == all ]]; then
  single idle-15000 --spawn --mode idle -c 15000 --warmup 1s --duration 5s
  single idle-ws-15000 --spawn --mode idle --idle-ws -c 15000 --warmup 1s --duration 5s
fi

if [[ $what == http || $what == all ]]; then
  command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk nginx-light)"; exit 1; }
  for quota in 40 none; do
    q=(); [[ $quota == none ]] || q=(--server-quota "$quota")
    for depth in 16 1; do
      run "http-wrk-c256-d$depth-q$quota" --spawn --mode http --wrk -c 256 -d "$depth" "${common[@]}" "${q[@]}" \
        --compare "$PWD/target/reference/limit-http --port {port}" --compare-name C-limit-http \
        --compare "$EX/may-plaintext --port {port}" --compare-name may-minihttp \
        --compare "$EX/hyper-plaintext --port {port}" --compare-name hyper \
        --compare "$PWD/benches/nginx.sh {port}" --compare-name nginx
    done
  done
fi

if [[ $what == ws || $what == all ]]; then
  for quota in 40 none; do
    q=(); [[ $quota == none ]] || q=(--server-quota "$quota")
    run "ws-echo-c100-q$quota" --spawn --mode ws -c 100 -d 1 -s 64 "${common[@]}" "${q[@]}" \
      --compare "$EX/fastwebsockets-echo --port {port}" --compare-name fastwebsockets \
      --compare "$EX/tungstenite-echo --port {port}" --compare-name tokio-tungstenite
  done
fi

if [[ $what == fanout || $what == all ]]; then
  # 10,000 subscribers, one publish per millisecond (the target), then a rate this 2-core host
  # sustains; and the same over 2 shards (sharing core 1 with the load generator).
  single fanout-10k-1000ps-1shard --spawn --mode fanout -c 10000 --rate 1000 --server-cores 0 --client-cores 1 --warmup 2s --duration 10s
  single fanout-10k-100ps-1shard --spawn --mode fanout -c 10000 --rate 100 --server-cores 0 --client-cores 1 --warmup 2s --duration 10s
  single fanout-1k-1000ps-1shard --spawn --mode fanout -c 1000 --rate 1000 --server-cores 0 --client-cores 1 --warmup 2s --duration 10s
  single fanout-10k-1000ps-2shards --spawn --shards 2 --mode fanout -c 10000 --rate 1000 --server-cores 0,1 --client-cores 1 --warmup 2s --duration 10s
fi

if [[ $what == connect || $what == all ]]; then
  # Connection churn, 2 shards: round-robin through the acceptor thread vs reuseport (each shard
  # accepts on its own listener), alternating, 3 rounds each.
  for r in 1 2 3; do
    for b in round-robin reuseport; do
      single "connect-$b-$r" --spawn --shards 2 --server-cores 0,1 --client-cores 1 --balance "$b" \
        --mode connect -c 8 --warmup 1s --duration 4s
    done
  done
fi

if [[ $what == sweep || $what == all ]]; then
  echo "== sweep" | tee -a "$out/summary.txt" || true
  "$B" bench --spawn --sweep-shards 1,2 --mode echo -c 200 -d 4 --server-cores 0,1 --client-cores 1 \
    --warmup 1s --duration 4s --rounds 3 --json "$out/sweep.json" 2>&1 | tee "$out/sweep.txt" | tail -8 | tee -a "$out/summary.txt" || true
fi
