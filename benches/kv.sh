#!/usr/bin/env bash
# The kv example against redis-server, side by side: `redis-benchmark -t set,get -P 16 -c 50`
# against each server in turn, for ROUNDS rounds (servers alternating within each round), and
# the medians, spreads and ratios.
#
#   [ROUNDS=5] [REQUESTS=2000000] [KEYS=100000] [QUOTA=40] benches/kv.sh
#
# Rows:
#   kv-1     examples/kv, one shard, pinned to core 0 and capped at QUOTA% of it
#   redis    redis-server (one thread, no persistence), pinned to core 0, capped the same
#   kv-2     examples/kv, two shards on cores 0 and 1, capped at 2 x QUOTA% in all (one cgroup:
#            each shard takes about QUOTA% of its core, the load being even)
# The load (redis-benchmark, one thread) runs on core 1; for kv-2, which needs both cores, on
# cores 0 and 1. Keys are drawn from KEYS (`-r`) so that, with two shards, requests spread over
# both and about half cross to the other shard.
#
# The cap is a cgroup CPU quota (cgroup v1 under /sys/fs/cgroup/cpu, or v2's cpu.max), as
# `shardnet bench --server-quota` does: it needs root. Without root the rows run uncapped, and
# say so. Needs redis-server and redis-benchmark (apt-get install redis-server redis-tools) and
# taskset (util-linux). Output: bench-out/kv.txt (each run) and bench-out/kv-summary.txt.
#
# Every step is bounded: a server that does not answer PING within 10 s, or a benchmark that runs
# past 120 s, ends the script with an error; the servers are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
REQUESTS=${REQUESTS:-2000000}
KEYS=${KEYS:-100000}
QUOTA=${QUOTA:-40}
out=bench-out
mkdir -p "$out"
runs=$out/kv.txt
summary=$out/kv-summary.txt
: >"$runs"

for tool in redis-server redis-benchmark redis-cli taskset python3; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool is not installed (apt-get install redis-server redis-tools util-linux python3)" >&2
    exit 1
  }
done
cargo build --release --quiet --example kv
KV=target/release/examples/kv

# The cgroup CPU controller, if we may use it.
cgroot=""
if [ "$(id -u)" = 0 ]; then
  if [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    cgroot=/sys/fs/cgroup/cpu; cgkind=v1
  elif [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    cgroot=/sys/fs/cgroup; cgkind=v2
  fi
fi
[ -n "$cgroot" ] || echo "note: no writable cgroup CPU controller (root needed): the servers run uncapped" | tee -a "$runs" >&2

pid=""
cg=""
stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    # Bounded: SIGKILL after 10 s.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
  fi
  if [ -n "$cg" ]; then
    rmdir "$cg" 2>/dev/null || true
    cg=""
  fi
}
trap stop EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start CORES PERCENT COMMAND...: runs COMMAND pinned to CORES, in a new cgroup capped at PERCENT
# of one core (when there is a cgroup controller); sets `pid` and `cg`.
start() {
  local cores=$1 percent=$2
  shift 2
  if [ -n "$cgroot" ]; then
    cg=$cgroot/shardnet-kv-$$-$RANDOM
    mkdir "$cg"
    local period=100000 quota=$((100000 * percent / 100))
    if [ "$cgkind" = v1 ]; then
      echo $period >"$cg/cpu.cfs_period_us"
      echo $quota >"$cg/cpu.cfs_quota_us"
    else
      echo "$quota $period" >"$cg/cpu.max"
    fi
  fi
  # The shell joins the cgroup, then becomes the server: it runs capped from its first
  # instruction.
  CG=$cg sh -c '[ -z "$CG" ] || echo $$ >"$CG/cgroup.procs"; exec taskset -c "$0" "$@"' \
    "$cores" "$@" >/dev/null 2>&1 &
  pid=$!
}

wait_ready() {
  local port=$1
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "error: the server exited before answering" >&2; exit 1; }
    sleep 0.1
  done
  echo "error: the server did not answer PING on port $port within 10 s" >&2
  exit 1
}

# measure NAME SERVER_CORES PERCENT CLIENT_CORES COMMAND...: one run, appended to $runs as
# `NAME SET rps` and `NAME GET rps`.
measure() {
  local name=$1 cores=$2 percent=$3 client=$4
  shift 4
  local port
  port=$(free_port)
  local cmd=("$@")
  cmd=("${cmd[@]//\{port\}/$port}")
  start "$cores" "$percent" "${cmd[@]}"
  wait_ready "$port"
  local text
  text=$(timeout 120 taskset -c "$client" redis-benchmark -h 127.0.0.1 -p "$port" \
    -t set,get -P 16 -c 50 -n "$REQUESTS" -r "$KEYS" -q 2>&1 | tr '\r' '\n')
  stop
  if grep -qiE 'error|warn' <<<"$text"; then
    echo "error: redis-benchmark against $name reported: $(grep -iE 'error|warn' <<<"$text" | head -3)" >&2
    exit 1
  fi
  for t in SET GET; do
    local rps
    rps=$(grep -E "^ *$t: [0-9.]+ requests per second" <<<"$text" | tail -1 | sed -E 's/^ *[A-Z]+: ([0-9.]+).*/\1/')
    [ -n "$rps" ] || { echo "error: no $t result for $name: $text" >&2; exit 1; }
    echo "$name $t $rps" | tee -a "$runs"
  done
}

two=$((2 * QUOTA))
started=$(date +%s)
for round in $(seq "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  # Alternate the order, so neither server always runs first (after the other has warmed the
  # caches, or while the machine settles).
  if [ $((round % 2)) = 1 ]; then order="kv-1 redis kv-2"; else order="redis kv-2 kv-1"; fi
  for row in $order; do
    case $row in
      kv-1) measure kv-1 0 "$QUOTA" 1 "$KV" --addr '127.0.0.1:{port}' --shards 1 --cores 0 ;;
      redis) measure redis 0 "$QUOTA" 1 redis-server --port '{port}' --bind 127.0.0.1 --save '' \
        --appendonly no --io-threads 1 --daemonize no --protected-mode no ;;
      kv-2) measure kv-2 0,1 "$two" 0,1 "$KV" --addr '127.0.0.1:{port}' --shards 2 --cores 0,1 ;;
    esac
  done
done
elapsed=$(($(date +%s) - started))

python3 - "$runs" "$summary" "$QUOTA" "$REQUESTS" "$KEYS" "$ROUNDS" "$elapsed" "${cgroot:+capped}" <<'EOF'
import statistics, sys, subprocess, platform
runs, summary, quota, requests, keys, rounds, elapsed, capped = sys.argv[1:9]
rows = {}
for line in open(runs):
    parts = line.split()
    if len(parts) == 3 and parts[1] in ("SET", "GET"):
        rows.setdefault((parts[0], parts[1]), []).append(float(parts[2]))
def med(k): return statistics.median(rows[k])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cap = f"capped at {quota}% of a core per shard (cgroup CPU quota)" if capped else "UNCAPPED (no cgroup controller)"
lines = [
    f"kv vs redis-server: redis-benchmark -t set,get -P 16 -c 50 -n {requests} -r {keys}, {rounds} rounds, {elapsed} s",
    f"machine: {cpu}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, Linux {platform.release()}; commit {commit}; servers {cap}",
    f"{'row':8} {'test':4} {'median req/s':>13} {'min':>11} {'max':>11}",
]
for (name, test), v in sorted(rows.items()):
    lines.append(f"{name:8} {test:4} {med((name, test)):13,.0f} {min(v):11,.0f} {max(v):11,.0f}")
for test in ("SET", "GET"):
    if ("kv-1", test) in rows and ("redis", test) in rows:
        lines.append(f"{test}: kv-1 / redis = {med(('kv-1', test)) / med(('redis', test)):.2f}x (goal >= 1.5x per core)")
    if ("kv-2", test) in rows and ("kv-1", test) in rows:
        lines.append(f"{test}: kv-2 / kv-1 = {med(('kv-2', test)) / med(('kv-1', test)):.2f}x (two shards on two cores vs one)")
text = "\n".join(lines) + "\n"
open(summary, "w").write(text)
print(text, end="")
EOF
