#!/usr/bin/env bash
# Runs the benchmark comparisons of the README's "Benchmarking" section, side by side in one run:
# server pinned to core 0 (optionally capped at 40% of it by a cgroup CPU quota), load generator
# on core 1, alternating servers, median of 3 rounds.
#
#   [ROUNDS=5] benches/run-all.sh [SECTION ...]   sections: echo trigger idle http ws fanout connect sweep all (default: all)
#
# What each part needs, and what happens without it (said in a `note:` line, the rest runs):
#   root                 the q40 rows (cgroup CPU quota); without it only the uncapped rows run
#   wrk                  the http section (apt-get install wrk); without it that section is skipped
#   nginx (nginx-light)  the nginx column of http (apt-get install nginx-light)
#   gcc + ../shared/reference/limit-{echo,http}.c
#                        the C reference columns of echo and http; the C sources are not in this
#                        repository: they are the project's shared folder, checked out beside it
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
mkdir -p "$out"
note() { echo "note: $*" | tee -a "$out/summary.txt" >&2; }
cargo build --release --bin shardnet --examples >/dev/null

# reference NAME: builds target/reference/NAME from ../shared/reference/NAME.c if it can, and
# fills `ref` with the --compare arguments for it (empty, with a note, if it cannot).
reference() {
  local name=$1 src=../shared/reference/$1.c
  ref=()
  if [ ! -x "target/reference/$name" ]; then
    if [ ! -f "$src" ]; then
      note "$src not found: the C reference servers come from the project's shared folder (../shared/reference beside this repository); the C-$name column is left out"
      return 0
    fi
    if ! command -v gcc >/dev/null; then
      note "gcc not installed (apt-get install gcc): the C-$name column is left out"
      return 0
    fi
    mkdir -p target/reference
    gcc -O2 -o "target/reference/$name" "$src"
  fi
  ref=(--compare "$PWD/target/reference/$name --port {port}" --compare-name "C-$name")
}

# The cgroup CPU quota needs root; without it the capped rows are left out.
if [ "$(id -u)" = 0 ]; then
  quotas="40 none"; q40=(--server-quota 40)
else
  quotas="none"; q40=()
  case $what in echo|trigger|http|ws|all) note "not root: no cgroup CPU quota, so the q40 rows are left out (trigger runs uncapped)";; esac
fi
B=target/release/shardnet
EX=target/release/examples
common=(--server-cores 0 --client-cores 1 --rounds "${ROUNDS:-3}" --warmup 1s --duration 4s)

run() { # name, args...
  local name=$1; shift
  echo "== $name" | tee -a "$out/summary.txt" || true
  "$B" bench "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" | sed -n '/^median/,$p' | tee -a "$out/summary.txt" || true
}
single() { # name, args...: one run (no --compare); its table (or idle report) goes to the summary
  local name=$1; shift
  echo "== $name" | tee -a "$out/summary.txt" || true
  "$B" bench "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" | sed -En '/^server |: idle: /,$p' | tee -a "$out/summary.txt" || true
}

if [[ $what == echo || $what == all ]]; then
  reference limit-echo
  for quota in $quotas; do
    q=(); [[ $quota == none ]] || q=(--server-quota "$quota")
    for load in "50 1" "50 16" "1000 1"; do
      set -- $load
      run "echo-c$1-d$2-q$quota" --spawn --mode echo -c "$1" -d "$2" -s 64 "${common[@]}" "${q[@]}" \
        "${ref[@]}" --compare "$PWD/$EX/tokio-echo --port {port}" --compare-name tokio-echo
    done
  done
fi

if [[ $what == trigger || $what == all ]]; then
  for t in edge level edge level edge level; do
    echo "== trigger $t" | tee -a "$out/summary.txt" || true
    "$B" bench --spawn --trigger "$t" --mode echo -c 50 -d 16 "${q40[@]}" --server-cores 0 --client-cores 1 \
      --warmup 1s --duration 4s 2>&1 | grep -E '^shardnet' | tee -a "$out/summary.txt" || true
  done
fi

if [[ $what == idle || $what == all ]]; then
  single idle-15000 --spawn --mode idle -c 15000 --warmup 1s --duration 5s
  single idle-ws-15000 --spawn --mode idle --idle-ws -c 15000 --warmup 1s --duration 5s
fi

have_wrk() { command -v wrk >/dev/null || { note "the http section needs wrk (apt-get install wrk): skipped"; return 1; }; }
if [[ $what == http || $what == all ]] && have_wrk; then
  reference limit-http
  nginx=(--compare "$PWD/benches/nginx.sh {port}" --compare-name nginx)
  [ -x /usr/sbin/nginx ] || { note "nginx not installed (apt-get install nginx-light): the nginx column is left out"; nginx=(); }
  for quota in $quotas; do
    q=(); [[ $quota == none ]] || q=(--server-quota "$quota")
    for depth in 16 1; do
      run "http-wrk-c256-d$depth-q$quota" --spawn --mode http --wrk -c 256 -d "$depth" "${common[@]}" "${q[@]}" \
        "${ref[@]}" \
        --compare "$EX/may-plaintext --port {port}" --compare-name may-minihttp \
        --compare "$EX/hyper-plaintext --port {port}" --compare-name hyper \
        "${nginx[@]}"
    done
  done
fi

if [[ $what == ws || $what == all ]]; then
  for quota in $quotas; do
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
