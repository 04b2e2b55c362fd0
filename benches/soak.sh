#!/usr/bin/env bash
# Soak: well-behaved echo, HTTP and WebSocket load from `shardnet bench` (open loop, fixed rate)
# against a release `shardnet serve` with known bounds, first alone (baseline), then beside
# every kind of abusive client of issue 11 (benches/abusers.py). Reports the well-behaved p99
# with and without the abusers, the server's peak RSS against the bound the configuration
# implies, crashes, and the connections closed by each limit; the table goes to stdout and the
# JSON to bench-out/soak.json (every run's raw files under bench-out/soak/).
#
#   benches/soak.sh                 # two runs of 10 minutes each (about 25 minutes in all)
#   benches/soak.sh --minutes 0.2   # 12 s each: checks the script, not the server
#
# Beside the bench, a probe (benches/soak.py probe) sends one HTTP request every 10 ms on one
# keep-alive connection and times each from its intended send time to the microsecond: the
# bench's open loop sends in 10 ms ticks, so its own p99 has a floor of about one tick.
# Needs python3 (standard library). The server runs on core 0, the load, the probe and the
# abusers on core 1 (when `taskset` exists and there are two cores); the abusers run at nice 10
# so that the load generator, not the abusers, gets core 1 first. Every process started here is
# stopped by pid on every way out (trap), and every wait is bounded. --out is relative to the
# repository root.
set -euo pipefail

usage() {
	sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
	cat <<EOF
Options:
  --minutes M      length of each of the two runs (default 10; fractions allowed)
  --rate R         requests/s of each well-behaved workload (default 2000)
  --connections C  connections of each well-behaved workload (default 50)
  --shards N       server shards, all on core 0 (default 2)
  --fd-limit N     the server's RLIMIT_NOFILE, reached by the EMFILE abuser (default 2048)
  --out DIR        where the reports go (default bench-out)
  --no-build       use target/release/shardnet as it is
EOF
}

MINUTES=10 RATE=2000 CONNS=50 SHARDS=2 FD_LIMIT=2048 OUT=bench-out BUILD=1
while [[ $# -gt 0 ]]; do
	case "$1" in
	--minutes) MINUTES=${2:?}; shift 2 ;;
	--rate) RATE=${2:?}; shift 2 ;;
	--connections) CONNS=${2:?}; shift 2 ;;
	--shards) SHARDS=${2:?}; shift 2 ;;
	--fd-limit) FD_LIMIT=${2:?}; shift 2 ;;
	--out) OUT=${2:?}; shift 2 ;;
	--no-build) BUILD=0; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "soak.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
done
SECONDS_PER_RUN=$(awk -v m="$MINUTES" 'BEGIN { if (m !~ /^[0-9]*\.?[0-9]+$/ || m * 60 < 5) exit 1; printf "%d", m * 60 + 0.5 }') ||
	{ echo "soak.sh: --minutes must be a number of at least 0.1 (got $MINUTES)" >&2; exit 2; }
for n in "$RATE" "$CONNS" "$SHARDS" "$FD_LIMIT"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "soak.sh: $n is not a positive integer" >&2; exit 2; }
done
[[ $FD_LIMIT -ge 512 ]] || { echo "soak.sh: --fd-limit must be at least 512 (the load holds ~200)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "soak.sh: needs python3" >&2; exit 2; }

cd "$(dirname "$0")/.."
if [[ $BUILD == 1 ]]; then
	cargo build --release --bin shardnet
fi
BIN=target/release/shardnet
[[ -x $BIN ]] || { echo "soak.sh: $BIN is missing (cargo build --release)" >&2; exit 2; }
RUN_DIR=$OUT/soak
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR"/*

# Core 0 for the server, core 1 for everything that loads it, when both exist.
SERVER_PIN=() CLIENT_PIN=()
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
	SERVER_PIN=(taskset -c 0)
	CLIENT_PIN=(taskset -c 1)
	CLIENT_CORES=1
else
	echo "soak.sh: no taskset (util-linux) or one core: nothing is pinned" >&2
	CLIENT_CORES=0
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for _ in $(seq 50); do
		local alive=0
		for p in "${PIDS[@]}"; do
			kill -0 "$p" 2>/dev/null && alive=1
		done
		[[ $alive == 0 ]] && break
		sleep 0.1
	done
	for p in "${PIDS[@]}"; do
		kill -KILL "$p" 2>/dev/null || true
	done
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) for pid $1, at most $2 seconds; then TERM, then KILL. Its exit status goes
# to WAIT_RC (not printed: a command substitution would run this in a subshell, which cannot
# wait for this shell's children), and it leaves PIDS.
WAIT_RC=0
wait_for() {
	local pid=$1 limit=$2 t=0 p kept=()
	while kill -0 "$pid" 2>/dev/null && [[ $t -lt $((limit * 10)) ]]; do
		sleep 0.1
		t=$((t + 1))
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "soak.sh: pid $pid still running after ${limit} s: stopping it" >&2
		kill -TERM "$pid" 2>/dev/null || true
		sleep 2
		kill -KILL "$pid" 2>/dev/null || true
	fi
	WAIT_RC=0
	wait "$pid" 2>/dev/null || WAIT_RC=$?
	for p in "${PIDS[@]}"; do
		[[ $p == "$pid" ]] || kept+=("$p")
	done
	PIDS=("${kept[@]}")
}

# The limits: small enough that the bound on memory means something, each one reached by an
# abuser. max_connections is above the descriptor limit, so that EMFILE binds first.
IDLE=10 WRITE=3 HEADER=2 PING=5 PONG=3
MAX_WRITE=$((64 * 1024)) MAX_READ=$((256 * 1024)) MAX_MESSAGE=$((64 * 1024)) READ_BUFFER=$((16 * 1024))
MAX_TOPICS=64
CFG=$RUN_DIR/soak.toml
ws_route() {
	cat <<EOF
[[listener.websocket]]
path = "$1"
mode = "$2"
max_message = $MAX_MESSAGE
ping_interval = "${PING}s"
pong_timeout = "${PONG}s"
slow_consumer = "$3"
max_topics = $MAX_TOPICS
EOF
}
{
	cat <<EOF
# benches/soak.sh: the server's configuration (every limit here is reached by an abuser).
[server]
shards = $SHARDS
pin = false
max_connections = $((FD_LIMIT * 2))
stats_interval = "10s"
shutdown_timeout = "5s"
read_buffer = $READ_BUFFER
read_budget = $((READ_BUFFER * 4))

[limits]
idle_timeout = "${IDLE}s"
max_write_buffer = $MAX_WRITE
write_timeout = "${WRITE}s"
max_read_buffer = $MAX_READ

[[listener]]
name = "echo"
addr = "127.0.0.1:0"
service = "echo"

[[listener]]
name = "http"
addr = "127.0.0.1:0"
service = "http"
max_header = "8KiB"
max_body = "128KiB"
header_timeout = "${HEADER}s"
admin_routes = false
EOF
	ws_route /ws pubsub drop
	ws_route /ws/strict pubsub disconnect
	ws_route /ws/echo echo drop
	cat <<EOF

[[listener]]
name = "admin"
addr = "127.0.0.1:0"
service = "http"
EOF
} >"$CFG"
"$BIN" config check "$CFG" >/dev/null

# One run: a fresh server, the load (and the abusers when $2 is 1), then the checks at the end.
run_phase() {
	local name=$1 abuse=$2
	local sock=$TMP/notify-$name
	python3 benches/soak.py ready "$sock" "$TMP/$name.ready" 30 &
	local ready_pid=$!
	PIDS+=("$ready_pid")
	for _ in $(seq 50); do
		[[ -S $sock ]] && break
		sleep 0.1
	done
	(ulimit -n "$FD_LIMIT" && export NOTIFY_SOCKET=$sock && exec "${SERVER_PIN[@]}" "$BIN" serve --config "$CFG") \
		2>"$RUN_DIR/$name-server.log" &
	local server=$!
	PIDS+=("$server")
	wait_for "$ready_pid" 35
	if [[ $WAIT_RC != 0 ]]; then
		echo "soak.sh: the $name server did not become ready; its log:" >&2
		tail -20 "$RUN_DIR/$name-server.log" >&2
		exit 1
	fi
	local echo_addr http_addr admin_addr
	echo_addr=$(awk '$1 == "echo" { print $2 }' "$TMP/$name.ready")
	http_addr=$(awk '$1 == "http" { print $2 }' "$TMP/$name.ready")
	admin_addr=$(awk '$1 == "admin" { print $2 }' "$TMP/$name.ready")
	echo "== $name: server pid $server (echo $echo_addr, http $http_addr, admin $admin_addr)," \
		"${SECONDS_PER_RUN} s$([[ $abuse == 1 ]] && echo ', with abusers')"

	local span=$((SECONDS_PER_RUN + 3))
	python3 benches/soak.py sample --pid "$server" --admin "$admin_addr" \
		--seconds $((span + 60)) --out "$RUN_DIR/$name-samples.json" &
	local sampler=$!
	PIDS+=("$sampler")
	local loads=() mode target
	for mode in echo http ws; do
		target=$http_addr
		[[ $mode == echo ]] && target=$echo_addr
		"${CLIENT_PIN[@]}" "$BIN" bench --target "$target" --mode "$mode" -c "$CONNS" --rate "$RATE" \
			--warmup 2s --duration "${SECONDS_PER_RUN}s" --client-cores "$CLIENT_CORES" \
			--server-pid "$server" --admin "$admin_addr" --json "$RUN_DIR/$name-$mode.json" \
			>"$RUN_DIR/$name-$mode.log" 2>&1 &
		loads+=($!)
		PIDS+=($!)
	done
	# The probe and the abusers start once the load's connections are up (within its warm-up).
	sleep 1
	"${CLIENT_PIN[@]}" python3 benches/soak.py probe --http "$http_addr" --seconds "$span" \
		--out "$RUN_DIR/$name-probe.json" &
	loads+=($!)
	PIDS+=($!)
	local abusers=
	if [[ $abuse == 1 ]]; then
		"${CLIENT_PIN[@]}" nice -n 10 python3 benches/abusers.py --http "$http_addr" --echo "$echo_addr" \
			--seconds "$span" --json "$RUN_DIR/$name-abusers.json" --fd-limit "$FD_LIMIT" \
			--header-timeout $HEADER --write-timeout $WRITE --idle-timeout $IDLE \
			--ping-interval $PING --pong-timeout $PONG --max-message $MAX_MESSAGE \
			--max-read-buffer $MAX_READ --max-topics $MAX_TOPICS &
		abusers=$!
		PIDS+=("$abusers")
	fi
	local p
	for p in "${loads[@]}"; do
		wait_for "$p" $((span + 120))
		[[ $WAIT_RC == 0 ]] || echo "soak.sh: a load process exited with $WAIT_RC (see $RUN_DIR/$name-*.log)" >&2
	done
	if [[ -n $abusers ]]; then
		wait_for "$abusers" 90
		[[ $WAIT_RC == 0 ]] || echo "soak.sh: the abusers exited with $WAIT_RC" >&2
	fi

	# The end: the server must be alive and healthy, then drain and exit 0 on SIGTERM.
	python3 benches/soak.py get "http://$admin_addr/healthz" >"$RUN_DIR/$name-health" || true
	python3 benches/soak.py get "http://$admin_addr/stats" --out "$RUN_DIR/$name-stats.json" >/dev/null || true
	awk '/^VmHWM/ { print $2 * 1024 }' "/proc/$server/status" >"$RUN_DIR/$name-hwm" 2>/dev/null || true
	kill -TERM "$sampler" 2>/dev/null || true
	wait_for "$sampler" 10
	kill -TERM "$server" 2>/dev/null || true
	wait_for "$server" 20
	echo "$WAIT_RC" >"$RUN_DIR/$name-exit"
	echo "   health $(cat "$RUN_DIR/$name-health"), exit $(cat "$RUN_DIR/$name-exit")"
}

run_phase baseline 0
run_phase abuse 1

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit+changes"
machine="$(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
python3 benches/soak.py report --dir "$RUN_DIR" --json "$OUT/soak.json" --minutes "$MINUTES" \
	--commit "$commit" --machine "$machine" --fd-limit "$FD_LIMIT" \
	--max-write-buffer $MAX_WRITE --max-read-buffer $MAX_READ \
	--overshoot $((MAX_MESSAGE > 4 * READ_BUFFER ? MAX_MESSAGE : 4 * READ_BUFFER))
