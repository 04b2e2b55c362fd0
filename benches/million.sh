#!/usr/bin/env bash
# One million connections on one host, in three scenarios (README: "One million connections"):
#
#   idle       CONNECTIONS TCP connections opened, held HOLD, every one checked still open at the
#              end (each echoes a probe byte): connect rate, user and kernel bytes per connection.
#   idle-ws    the same with WebSocket connections (upgraded on /ws, not subscribed): user bytes
#              per idle WebSocket.
#   busy       the same number held while an open loop of RATE requests/s goes to connections
#              chosen at random; latency from each request's intended send time, compared with the
#              same load on BASELINE connections over the same processes.
#   busy-reference  the busy scenario (and its baseline) against copies of the C reference echo
#              server (benches/reference/limit-echo-reuseport.c: ../shared/reference's
#              limit-echo with SO_REUSEPORT), as many as the busy run's server processes, on the
#              same cores: what a million sockets cost a server with no state of its own (needs
#              cc).
#   broadcast  CONNECTIONS WebSocket subscribers of one topic; PUBLISHES publishes, each posted to
#              every server process (they share no pub/sub state) and reaching every subscriber:
#              delivery latency p50/p99/max over the subscribers, and none lost.
#   takeover   CONNECTIONS idle TCP connections held while every server process, one after
#              another, hands its listeners and connections over to a new process (issue 16,
#              `bench --takeover-all`); every connection is then checked still open.
#
# Usage: benches/million.sh [all|idle|idle-ws|busy|busy-reference|broadcast|takeover]...
#        (default: all = idle busy broadcast)
#
# Environment (defaults in brackets):
#   CONNECTIONS [1000000]  connections per scenario; 20000 is a rehearsal of a minute or two
#   HOLD [60s]             how long the idle scenario holds them
#   RATE [20000]           the busy scenario's requests per second
#   BUSY_SECONDS [30s]     the busy scenario's measured window (after a 5 s warm-up)
#   BASELINE [1000]        the busy scenario's comparison connection count
#   PUBLISHES [10]         the broadcast scenario's publishes, at PUBLISH_RATE [0.25] per second
#   TAKEOVER_HOLD [120s]   how long the takeover scenario holds them (the hand-overs start
#                          half-way)
#   SHARDS [1]             shards per server process
#   SERVER_CORES [0] CLIENT_CORES [1]   taskset cores of the server and client processes (the
#                          server processes take theirs in turn)
#   BROADCAST_SERVER_CORES [0,1] BROADCAST_CLIENT_CORES [0,1]   the same for broadcast: a publish
#                          is a million writes, spread over every core
#   OUT [bench-out/million]            JSON and text reports
#   BIN [target/release/shardnet]      built with `cargo build --release` when missing
#   TUNE [0]               1 (as root): raise the sysctls below for the run; they are restored on
#                          exit, whatever the exit
#
# The bench picks the server processes (reuse_port, one port), client processes and source
# addresses (127.0.0.2...) that -c needs under this host's RLIMIT_NOFILE and port range, and says
# so. Every scenario runs under `timeout`; on any exit (the end, an error, Ctrl-C, a TERM) the
# trap stops the bench and every process under it, by pid; the bench's own children also die
# with it (PR_SET_PDEATHSIG).
set -euo pipefail

cd "$(dirname "$0")/.."
CONNECTIONS=${CONNECTIONS:-1000000}
HOLD=${HOLD:-60s}
RATE=${RATE:-20000}
BUSY_SECONDS=${BUSY_SECONDS:-30s}
BASELINE=${BASELINE:-1000}
PUBLISHES=${PUBLISHES:-10}
PUBLISH_RATE=${PUBLISH_RATE:-0.25}
TAKEOVER_HOLD=${TAKEOVER_HOLD:-120s}
SHARDS=${SHARDS:-1}
SERVER_CORES=${SERVER_CORES:-0}
CLIENT_CORES=${CLIENT_CORES:-1}
BROADCAST_SERVER_CORES=${BROADCAST_SERVER_CORES:-0,1}
BROADCAST_CLIENT_CORES=${BROADCAST_CLIENT_CORES:-0,1}
OUT=${OUT:-bench-out/million}
BIN=${BIN:-target/release/shardnet}
TUNE=${TUNE:-0}
scenarios=("$@")
[ ${#scenarios[@]} -eq 0 ] && scenarios=(all)

# sysctls TUNE=1 sets (name value): wider ephemeral ports (fewer source addresses, shorter port
# searches), room in accept queues, and TCP memory limits (pages) above what a million sockets'
# buffers are charged (about a page per socket that has received data, both ends here).
TUNED=(
    "net.ipv4.ip_local_port_range" "1024 65535"
    "net.core.somaxconn" "65535"
    "net.ipv4.tcp_max_syn_backlog" "65535"
    "net.ipv4.tcp_mem" "3000000 4000000 6000000"
)
SAVED=()
RUNNING=""
REFPIDS=()

log() { echo "million.sh: $*" >&2; }

# Every descendant of pid $1, deepest first.
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

stop_running() {
    [ -n "$RUNNING" ] || return 0
    local pids
    pids="$(descendants "$RUNNING") $RUNNING"
    # TERM first (the bench's guards stop what they own), then KILL whatever is left, by pid.
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        local alive=""
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && break
        sleep 0.2
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    RUNNING=""
    # Processes that took over (takeover scenario) are no one's descendants here: the bench
    # stops them by pid, and these are what an interrupted run leaves.
    pkill -KILL -f -- "--takeover ${TMPDIR:-/tmp}/shardnet-bench-" 2>/dev/null || true
}

restore_sysctls() {
    local i
    for ((i = 0; i < ${#SAVED[@]}; i += 2)); do
        sysctl -q -w "${SAVED[i]}=${SAVED[i + 1]}" >/dev/null && log "restored ${SAVED[i]} = ${SAVED[i + 1]}"
    done
    SAVED=()
}

stop_reference() {
    [ ${#REFPIDS[@]} -gt 0 ] || return 0
    kill -TERM "${REFPIDS[@]}" 2>/dev/null || true
    wait "${REFPIDS[@]}" 2>/dev/null || true
    REFPIDS=()
}

cleanup() {
    local rc=$?
    stop_running
    stop_reference
    restore_sysctls
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check_host() {
    local c=$CONNECTIONS
    log "host: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    log "RLIMIT_NOFILE soft $(ulimit -Sn) hard $(ulimit -Hn)"
    for key in net.ipv4.ip_local_port_range fs.file-max fs.nr_open net.core.somaxconn \
        net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_mem; do
        log "$key = $(sysctl -n "$key" | tr '\t' ' ')"
    done
    free -g >&2
    # Both ends of every connection are on this host: two descriptors each.
    local file_max
    file_max=$(sysctl -n fs.file-max)
    if [ "$file_max" -lt $((2 * c + 100000)) ]; then
        log "fs.file-max = $file_max is below 2 x $c connections: raise it (sysctl -w fs.file-max=$((2 * c + 100000)))"
        exit 1
    fi
    # About 10 KB of kernel memory per connection pair and a few hundred bytes in the client
    # processes (measured at 20,000): refuse rather than push the host into reclaim.
    local avail_kb need_kb
    avail_kb=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
    need_kb=$((c * 14))
    if [ "$avail_kb" -lt "$need_kb" ]; then
        log "MemAvailable $((avail_kb / 1024)) MiB is below the $((need_kb / 1024)) MiB $c connections need"
        exit 1
    fi
}

tune() {
    [ "$TUNE" = 1 ] || return 0
    if [ "$(id -u)" != 0 ]; then
        log "TUNE=1 needs root"
        exit 1
    fi
    local i
    for ((i = 0; i < ${#TUNED[@]}; i += 2)); do
        local key=${TUNED[i]} want=${TUNED[i + 1]} now
        now=$(sysctl -n "$key" | tr '\t' ' ' | tr -s ' ')
        [ "$now" = "$want" ] && continue
        SAVED+=("$key" "$now")
        sysctl -q -w "$key=$want" >/dev/null
        log "set $key = $want (was $now; restored on exit)"
    done
}

# run NAME LIMIT_SECONDS ARGS...: one bench run under timeout, its output kept in $OUT/NAME.txt
# and its report in $OUT/NAME.json.
run() {
    local name=$1 limit=$2
    shift 2
    log "$name: shardnet bench $* (at most ${limit}s)"
    timeout --kill-after=20s "${limit}s" "$BIN" bench "$@" --json "$OUT/$name.json" \
        > >(tee "$OUT/$name.txt") 2>&1 &
    RUNNING=$!
    local rc=0
    wait "$RUNNING" || rc=$?
    RUNNING=""
    if [ "$rc" -ne 0 ]; then
        log "$name: failed (exit $rc); see $OUT/$name.txt"
        return "$rc"
    fi
}

# Seconds the connect phase may take: at least 10,000 connections a second, plus a minute.
connect_budget() { echo $((CONNECTIONS / 10000 + 60)); }

common=(--spawn --shards "$SHARDS" --server-cores "$SERVER_CORES" --client-cores "$CLIENT_CORES")

idle() {
    local hold_s=${HOLD%s}
    run idle $(($(connect_budget) + hold_s + 300)) "${common[@]}" \
        --mode idle -c "$CONNECTIONS" --warmup 1s --duration "$HOLD"
}

idle_ws() {
    local hold_s=${HOLD%s}
    run idle-ws $(($(connect_budget) + hold_s + 300)) "${common[@]}" \
        --mode idle --idle-ws -c "$CONNECTIONS" --warmup 1s --duration "$HOLD"
}

busy() {
    local window_s=${BUSY_SECONDS%s}
    run busy $(($(connect_budget) + window_s + 120)) "${common[@]}" \
        --mode echo -c "$CONNECTIONS" --rate "$RATE" --warmup 5s --duration "$BUSY_SECONDS"
    # The same load, the same processes, BASELINE connections.
    local k n
    read -r k n < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["runs"][0]; print(r["server_processes"], r["client_processes"])' "$OUT/busy.json")
    settle
    run busy-baseline $((window_s + 180)) "${common[@]}" --server-processes "$k" --processes "$n" \
        --mode echo -c "$BASELINE" --rate "$RATE" --warmup 5s --duration "$BUSY_SECONDS"
}

# Waits (at most a minute) until the kernel has let go of the last scenario's sockets, so that
# a baseline does not run during a million connections' teardown.
settle() {
    local i inuse
    for i in $(seq 1 60); do
        inuse=$(awk '/^TCP:/ {print $3}' /proc/net/sockstat)
        [ "$inuse" -lt $((2 * BASELINE + 1000)) ] && return 0
        sleep 1
    done
    log "settle: $inuse TCP sockets still in use after 60 s"
}

busy_reference() {
    local window_s=${BUSY_SECONDS%s} exe=$OUT/limit-echo-reuseport k port n i
    command -v cc >/dev/null || { log "busy-reference needs a C compiler (apt-get install gcc)"; exit 1; }
    cc -O2 -o "$exe" benches/reference/limit-echo-reuseport.c
    # As many copies as the busy run's server processes (or as it would start: 90% of the limit).
    if [ -f "$OUT/busy.json" ]; then
        k=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][0]["server_processes"])' "$OUT/busy.json")
    else
        k=$(python3 -c 'import resource,sys; h=resource.getrlimit(resource.RLIMIT_NOFILE)[1]; print(-(-int(sys.argv[1]) // int((h - 26) * 0.9)))' "$CONNECTIONS")
    fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    for ((i = 0; i < k; i++)); do
        taskset -c "$SERVER_CORES" "$exe" --port "$port" &
        REFPIDS+=($!)
    done
    sleep 1
    log "busy-reference: $k copies of limit-echo-reuseport on 127.0.0.1:$port, cores $SERVER_CORES"
    settle
    run busy-reference $(($(connect_budget) + window_s + 120)) --target "127.0.0.1:$port" \
        --client-cores "$CLIENT_CORES" --mode echo -c "$CONNECTIONS" --rate "$RATE" --warmup 5s \
        --duration "$BUSY_SECONDS"
    n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][0]["client_processes"])' "$OUT/busy-reference.json")
    settle
    run busy-reference-baseline $((window_s + 180)) --target "127.0.0.1:$port" \
        --client-cores "$CLIENT_CORES" --processes "$n" --mode echo -c "$BASELINE" --rate "$RATE" \
        --warmup 5s --duration "$BUSY_SECONDS"
    stop_reference
}

broadcast() {
    local publish_s
    publish_s=$(python3 -c "import sys; print(int(float(sys.argv[1]) / float(sys.argv[2])) + 1)" "$PUBLISHES" "$PUBLISH_RATE")
    run broadcast $(($(connect_budget) * 2 + publish_s + 180)) --spawn --shards "$SHARDS" \
        --server-cores "$BROADCAST_SERVER_CORES" --client-cores "$BROADCAST_CLIENT_CORES" \
        --mode fanout -c "$CONNECTIONS" --rate "$PUBLISH_RATE" --publishes "$PUBLISHES" --warmup 0s
}

takeover() {
    local hold_s=${TAKEOVER_HOLD%s}
    run takeover $(($(connect_budget) + hold_s + 300)) "${common[@]}" \
        --mode idle -c "$CONNECTIONS" --warmup 1s --duration "$TAKEOVER_HOLD" --takeover-all
}

summary() {
    python3 - "$OUT" "$@" <<'EOF'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
def load(n):
    p = os.path.join(out, n + ".json")
    return json.load(open(p))["runs"][0] if os.path.exists(p) else None
def f(v, fmt="{:.0f}"):
    return "n/a" if v is None else fmt.format(v)
for n in names:
    r = load(n)
    if r is None:
        continue
    m = r.get("memory") or {}
    k = m.get("kernel") or {}
    l = r["latency_us"]
    servers = "copies of the C reference" if n.startswith("busy-reference") else f"{r['server_processes']} server"
    print(f"{n}: {r['connections']} connections over {servers} and "
          f"{r['client_processes']} client processes, opened at {f(r.get('connects_per_second'))}/s, "
          f"{r['errors']} errors")
    print(f"    user {f(m.get('user_bytes_per_connection'))} B/conn (server PSS), kernel Slab "
          f"{f(k.get('slab_bytes_per_connection'))} B/conn, socket buffers "
          f"{f(k.get('socket_buffer_bytes_per_connection'))} B/conn (both ends)")
    if r.get("idle"):
        print(f"    {r['idle']['verified']} of {r['connections']} answered the final probe "
              f"after {r['idle']['held_seconds']:.0f} s")
    txt = os.path.join(out, n + ".txt")
    for line in open(txt) if os.path.exists(txt) else []:
        if "takeover-all:" in line:
            print("    " + line.strip())
    if r["mode"] != "idle":
        print(f"    {r['requests_per_second']:.0f}/s, latency p50 {l['p50']} us, p99 {l['p99']} us, "
              f"p99.9 {l['p999']} us, max {l['max']} us")
    fo = r.get("fanout")
    if fo:
        print(f"    {fo['subscribers']} subscribers x {fo['published']} publishes: "
              f"{fo['delivered']} delivered, {fo['lost']} lost; server CPU "
              f"{f(fo.get('server_cpu_seconds_per_million_deliveries'), '{:.2f}')} s per million deliveries")
for name in ("busy", "busy-reference"):
    busy, base = load(name), load(name + "-baseline")
    if busy and base and busy["latency_us"]["p99"] and base["latency_us"]["p99"]:
        print(f"{name} p99 at {busy['connections']} / at {base['connections']}: "
              f"{busy['latency_us']['p99'] / base['latency_us']['p99']:.2f}x (target <= 1.5x)")
EOF
}

[ -x "$BIN" ] || cargo build --release
mkdir -p "$OUT"
check_host
tune
ran=()
for s in "${scenarios[@]}"; do
    case $s in
    all) idle; busy; broadcast; ran+=(idle busy busy-baseline broadcast) ;;
    idle) idle; ran+=(idle) ;;
    idle-ws) idle_ws; ran+=(idle-ws) ;;
    busy) busy; ran+=(busy busy-baseline) ;;
    busy-reference) busy_reference; ran+=(busy-reference busy-reference-baseline) ;;
    broadcast) broadcast; ran+=(broadcast) ;;
    takeover) takeover; ran+=(takeover) ;;
    *) log "unknown scenario '$s' (all, idle, idle-ws, busy, busy-reference, broadcast, takeover)"; exit 2 ;;
    esac
done
summary "${ran[@]}"
