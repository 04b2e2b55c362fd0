#!/usr/bin/env bash
# The closing benchmarks of four features, each measured the way its issue asks, side by side in
# one run: server pinned to core 0, load generator on core 1, variants alternating round by round
# (the first slot rotates), medians of ROUNDS rounds with their spread (min-max) and the ratios.
#
#   benches/features.sh [SECTION ...]      sections: broker deflate tls auth all (default: all)
#
#   broker   fan-out, SUBSCRIBERS subscribers x RATE publishes/s: one process (in-process
#            delivery) vs 2 processes through Redis vs through NATS (issue 13): deliveries/s,
#            publish-to-delivery p50/p99, lost, ratios to in-process
#   deflate  permessage-deflate (issue 14): idle memory of CONNECTIONS WebSocket connections,
#            plain vs compression negotiated (shared, dedicated); fan-out of 1 KiB JSON to
#            SUBSCRIBERS subscribers, compressed vs plain (deliveries per server CPU-second,
#            bytes on the wire); echo of 1 KiB JSON, compressed vs plain, server at 40% of a core
#   tls      TLS 1.3 (issue 18), shardnet vs nginx (benches/nginx-tls.sh) on the same
#            certificate: idle memory of CONNECTIONS TLS connections; full handshakes per server
#            CPU-second; HTTPS /plaintext pipelined x16 at 40% of a core (vs nginx-TLS and vs
#            plain-HTTP shardnet, with plain nginx beside); WSS echo vs plain WebSocket echo
#   auth     JWT verification (issue 19): connect rate with an ES256 and an HS256 token per
#            connection vs auth off (server CPU per verified connection); idle memory of
#            CONNECTIONS authenticated vs anonymous WebSocket connections, with pings off (the
#            bench's configuration: an authenticated connection's expiry is then its only
#            timer) and with the default 30-s ping (every connection has a timer)
#
# Sizes (environment; the defaults are the issues' sizes): ROUNDS=3 WARMUP=1s DURATION=4s
# CONNECTIONS=15000 (idle rows) SUBSCRIBERS=1000 RATE=1000 (broker and deflate fan-out, publishes/s)
# CONNECT_THREADS=8 (connect rows), SERVER_CORES=0 CLIENT_CORES=1. A check end to end at tiny
# scale: ROUNDS=1 WARMUP=1s DURATION=1s CONNECTIONS=500 SUBSCRIBERS=100 benches/features.sh
#
# What each part needs, and what happens without it (said in a `note:` line, the rest runs):
#   root                 the q40 rows (cgroup CPU quota): deflate echo, tls https (and the WSS
#                        row runs uncapped instead); without it those rows are left out
#   redis-server, nats-server   their broker column (apt-get install redis-server nats-server)
#   nginx (nginx-light)  the nginx columns of tls (apt-get install nginx-light)
#   openssl              the tls and auth sections (certificate, keys); skipped without it
#   python3              the summary (medians, spreads, ratios); without it only the raw
#                        reports are written
# Memory: the dedicated-compression idle row holds CONNECTIONS x ~260 KiB in the server (about
# 4 GB at 15,000).
#
# Results: one JSON report per bench run in bench-out/features/ (ROW.TAG.json, with the
# command's output beside it in ROW.TAG.txt), the summary in bench-out/features/summary.txt
# (and summary.json). Every bench run is bounded by `timeout` and everything the script starts
# is stopped by pid on exit; the expected duration is printed at the start (about 12 minutes
# for `all` at the default sizes).
set -euo pipefail
cd "$(dirname "$0")/.."

all_sections="broker deflate tls auth"
sections=()
for s in "${@:-all}"; do
  case $s in
    all) sections+=($all_sections) ;;
    broker|deflate|tls|auth) sections+=("$s") ;;
    *) echo "benches/features.sh: unknown section \`$s\` (broker deflate tls auth all)" >&2; exit 2 ;;
  esac
done

ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1s}
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-15000}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATE=${RATE:-1000}
CONNECT_THREADS=${CONNECT_THREADS:-8}
SERVER_CORES=${SERVER_CORES:-0}
CLIENT_CORES=${CLIENT_CORES:-1}

out=bench-out/features
mkdir -p "$out"
: >"$out/notes.txt"
: >"$out/commands.txt"
B=$PWD/target/release/shardnet
note() { echo "note: $*" | tee -a "$out/notes.txt" >&2; }

# Whole seconds (rounded up) of a duration as the bench takes it: 500ms, 4s, 2m.
secs() {
  case $1 in
    *ms) echo $(( (${1%ms} + 999) / 1000 )) ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *) echo "$1" ;;
  esac
}
W=$(secs "$WARMUP") D=$(secs "$DURATION")

# The quota's cgroup needs root.
root=0; [ "$(id -u)" = 0 ] && root=1

# Expected duration, from the sizes: per run, warm-up + measurement + ~2 s of start and stop,
# plus the time to open the idle rows' connections (about 3,000 a second, 2,000 with TLS) and
# the fan-out's wait for the last deliveries.
estimate() {
  local run=$((W + D + 2)) idle=$((CONNECTIONS / 3000 + 2)) tls=$((CONNECTIONS / 2000 + 2)) t=0 s
  for s in "${sections[@]}"; do
    case $s in
      broker) t=$((t + 3 * ROUNDS * (run + 3))) ;;
      deflate) t=$((t + 3 * ROUNDS * (run + idle) + 2 * ROUNDS * (run + 2) + root * 2 * ROUNDS * run)) ;;
      tls) t=$((t + 2 * ROUNDS * (run + tls) + 2 * ROUNDS * run + root * 4 * ROUNDS * run + 2 * ROUNDS * run)) ;;
      auth) t=$((t + 3 * ROUNDS * run + 4 * ROUNDS * (run + idle))) ;;
    esac
  done
  echo "$t"
}
est=$(estimate)
echo "benches/features.sh ${sections[*]}: ROUNDS=$ROUNDS WARMUP=$WARMUP DURATION=$DURATION CONNECTIONS=$CONNECTIONS SUBSCRIBERS=$SUBSCRIBERS RATE=$RATE; expected duration about $((est / 60)) min $((est % 60)) s (plus the build if the tree changed)" >&2

nice -n 10 cargo build --release --bin shardnet >/dev/null

# Everything started here lives under $work (TMPDIR for the bench's generated configurations
# and benches/nginx-tls.sh's directories) and is stopped by pid on exit: the bench run in
# flight (its `timeout` signals the whole process group: the bench, its servers, brokers and
# nginx), then empty cgroups that a killed bench left behind.
work=$(mktemp -d /tmp/shardnet-features.XXXXXX)
export TMPDIR=$work
cur=
cleanup() {
  if [ -n "$cur" ]; then
    kill -TERM "$cur" 2>/dev/null || true
    wait "$cur" 2>/dev/null || true
  fi
  for d in /sys/fs/cgroup/shardnet-bench-* /sys/fs/cgroup/cpu/shardnet-bench-*; do
    [ -d "$d" ] || continue
    pid=${d##*/shardnet-bench-}; pid=${pid%%-*}
    kill -0 "$pid" 2>/dev/null || rmdir "$d" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pin=(--server-cores "$SERVER_CORES" --client-cores "$CLIENT_CORES" --warmup "$WARMUP" --duration "$DURATION")
manifest=

# run ROW TAG MAP ARGS...: one `shardnet bench ARGS --json $out/ROW.TAG.json`, bounded in time.
# MAP ("label=variant ...") says which runs of the report count for which variant of ROW in
# the summary (a --compare report holds one run per server per round, labelled by server).
run() {
  local row=$1 tag=$2 map=$3 pair; shift 3
  local name=$row.$tag json=$out/$row.$tag.json servers=1 rounds=1 a prev= rc=0
  rm -f "$json"
  for pair in $map; do
    printf '%s\t%s\t%s\t%s\n' "$row" "${pair#*=}" "$json" "${pair%%=*}" >>"$manifest"
  done
  for a in "$@"; do
    [ "$prev" = --compare ] && servers=$((servers + 1))
    [ "$prev" = --rounds ] && rounds=$a
    prev=$a
  done
  # Per server and round: warm-up, measurement, connections, settling; generous, only a bound.
  local limit=$((servers * rounds * (W + D + 90) + 30))
  echo "== $name: shardnet bench $*" >>"$out/commands.txt"
  timeout -k 10 "$limit" "$B" bench "$@" --json "$json" >"$out/$name.txt" 2>&1 &
  cur=$!
  wait "$cur" || rc=$?
  cur=
  case $rc in
    0) echo "$name: done" >&2 ;;
    124|137) note "$name: stopped after ${limit}s (see $out/$name.txt)" ;;
    *) note "$name: exit $rc (see $out/$name.txt): $(grep -m1 -E 'failed|[Ee]rror:' "$out/$name.txt" || tail -1 "$out/$name.txt")" ;;
  esac
}

# rotate N ROUND: the indices 0..N-1 starting at ROUND mod N (who goes first changes per round).
rotate() { local i; for ((i = 0; i < $1; i++)); do echo $(((i + $2) % $1)); done; }

have() { command -v "$1" >/dev/null; }

# A configuration like the one the bench generates (echo and http listeners, /ws/echo and /ws
# routes, timeouts off), with TLS on both listeners ($1: a `tls = {...}` line or empty), an
# [auth] section ($2) and keys for the /ws route ($3).
config() {
  cat <<CONF
[server]
shards = 1
pin = true
trigger = "edge"
balance = "round-robin"
stats_interval = "0s"
shutdown_timeout = "2s"

[limits]
idle_timeout = "0s"

$2

[[listener]]
name = "echo"
addr = "127.0.0.1:0"
service = "echo"
backlog = 65535
$1

[[listener]]
name = "http"
addr = "127.0.0.1:0"
service = "http"
backlog = 65535
$1

[[listener.websocket]]
path = "/ws/echo"
mode = "echo"
ping_interval = "0s"

[[listener.websocket]]
path = "/ws"
mode = "pubsub"
ping_interval = "0s"
$3
CONF
}

section_broker() {
  local r k
  local -a brokers=(in-process)
  for b in redis nats; do
    if have "$b-server"; then brokers+=("$b"); else note "$b-server not installed (apt-get install $b-server): the $b column of broker is left out"; fi
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate ${#brokers[@]} $((r - 1))); do
      case ${brokers[$k]} in
        in-process) run broker "in-process.r$r" "shardnet=in-process" --spawn --mode fanout \
          -c "$SUBSCRIBERS" --rate "$RATE" "${pin[@]}" ;;
        *) run broker "${brokers[$k]}.r$r" "shardnet=${brokers[$k]}" --spawn --server-processes 2 \
          --broker "${brokers[$k]}" --mode fanout -c "$SUBSCRIBERS" --rate "$RATE" "${pin[@]}" ;;
      esac
    done
  done
}

section_deflate() {
  local r k
  local -a idle=(plain shared dedicated) two=(plain deflate)
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 3 $((r - 1))); do
      case ${idle[$k]} in
        plain) run deflate-idle "plain.r$r" "shardnet=plain" --spawn --mode idle --idle-ws -c "$CONNECTIONS" "${pin[@]}" ;;
        *) run deflate-idle "${idle[$k]}.r$r" "shardnet=${idle[$k]}" --spawn --mode idle --idle-ws \
          --deflate --compression "${idle[$k]}" -c "$CONNECTIONS" "${pin[@]}" ;;
      esac
    done
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 2 $((r - 1))); do
      case ${two[$k]} in
        plain) run deflate-fanout "plain.r$r" "shardnet=plain" --spawn --mode fanout --payload json -s 1024 \
          -c "$SUBSCRIBERS" --rate "$RATE" "${pin[@]}" ;;
        deflate) run deflate-fanout "deflate.r$r" "shardnet=deflate" --spawn --mode fanout --payload json -s 1024 \
          --deflate --compression shared -c "$SUBSCRIBERS" --rate "$RATE" "${pin[@]}" ;;
      esac
    done
  done
  if [ "$root" = 1 ]; then
    for ((r = 1; r <= ROUNDS; r++)); do
      for k in $(rotate 2 $((r - 1))); do
        case ${two[$k]} in
          plain) run deflate-echo-q40 "plain.r$r" "shardnet=plain" --spawn --mode ws --payload json -s 1024 \
            -c 50 -d 4 --server-quota 40 "${pin[@]}" ;;
          deflate) run deflate-echo-q40 "deflate.r$r" "shardnet=deflate" --spawn --mode ws --payload json -s 1024 \
            -c 50 -d 4 --deflate --compression shared --server-quota 40 "${pin[@]}" ;;
        esac
      done
    done
  else
    note "not root: no cgroup CPU quota, so the deflate echo row (server at 40% of a core) is left out"
  fi
}

section_tls() {
  local r k dir=$work/tls
  mkdir -p "$dir"
  # One self-signed P-256 certificate for both servers: the same signature per handshake.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
  config "tls = { cert = \"$dir/cert.pem\", key = \"$dir/key.pem\", min_version = \"1.3\" }" "" "" >"$dir/shardnet.toml"
  local -a tls=(--config "$dir/shardnet.toml" --tls --tls-ca "$dir/cert.pem" --tls-name localhost)
  local -a nginx=() nginx_plain=()
  local map_n= map_nh= map_np=
  if [ -x /usr/sbin/nginx ]; then
    nginx=(--compare "$PWD/benches/nginx-tls.sh {port} $dir/cert.pem $dir/key.pem" --compare-name nginx-tls)
    nginx_plain=(--compare "$PWD/benches/nginx.sh {port}" --compare-name nginx)
    map_n="nginx-tls=nginx-tls" map_nh="nginx-tls=nginx-https" map_np="nginx=nginx-http"
  else
    note "nginx not installed (apt-get install nginx-light): the nginx columns of tls are left out"
  fi
  run tls-idle all "shardnet=shardnet-tls $map_n" --mode idle -c "$CONNECTIONS" "${tls[@]}" \
    --rounds "$ROUNDS" "${pin[@]}" "${nginx[@]}" --spawn
  run tls-handshake all "shardnet=shardnet-tls $map_n" --mode connect -c "$CONNECT_THREADS" "${tls[@]}" \
    --rounds "$ROUNDS" "${pin[@]}" "${nginx[@]}" --spawn
  if [ "$root" = 1 ]; then
    for ((r = 1; r <= ROUNDS; r++)); do
      for k in $(rotate 2 $((r - 1))); do
        if [ "$k" = 0 ]; then
          run tls-https-q40 "tls.r$r" "shardnet=shardnet-https $map_nh" --spawn --mode http \
            -c 256 -d 16 --server-quota 40 "${tls[@]}" --rounds 1 "${pin[@]}" "${nginx[@]}"
        else
          run tls-https-q40 "plain.r$r" "shardnet=shardnet-http $map_np" --spawn --mode http \
            -c 256 -d 16 --server-quota 40 --rounds 1 "${pin[@]}" "${nginx_plain[@]}"
        fi
      done
    done
  else
    note "not root: no cgroup CPU quota, so the HTTPS pipelined row (server at 40% of a core) is left out and WSS echo runs uncapped"
  fi
  local wss=tls-wss q=()
  [ "$root" = 1 ] && { wss=tls-wss-q40; q=(--server-quota 40); }
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 2 $((r - 1))); do
      if [ "$k" = 0 ]; then
        run "$wss" "wss.r$r" "shardnet=wss" --spawn --mode ws -c 100 -s 64 "${q[@]}" "${tls[@]}" "${pin[@]}"
      else
        run "$wss" "ws.r$r" "shardnet=ws" --spawn --mode ws -c 100 -s 64 "${q[@]}" "${pin[@]}"
      fi
    done
  done
}

section_auth() {
  local r k dir=$work/auth
  mkdir -p "$dir"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/es256.key" 2>/dev/null
  openssl pkey -in "$dir/es256.key" -pubout -out "$dir/es256.pub" 2>/dev/null
  openssl rand -base64 48 >"$dir/hs256.secret"
  # Three servers alike but for how /ws verifies tokens: off, ES256 required, HS256 required;
  # and one where a token is optional (the idle rows: with and without one, on one server).
  config "" "" 'auth = "off"' >"$dir/off.toml"
  config "" "[auth]
[[auth.public_key]]
alg = \"ES256\"
file = \"$dir/es256.pub\"" 'auth = "required"' >"$dir/es256.toml"
  config "" "[auth]
hs256_secret_file = \"$dir/hs256.secret\"" 'auth = "required"' >"$dir/hs256.toml"
  config "" "[auth]
[[auth.public_key]]
alg = \"ES256\"
file = \"$dir/es256.pub\"" 'auth = "optional"' >"$dir/optional.toml"
  # The same with the default ping interval on /ws: both kinds then have a timer-wheel entry.
  sed '/^path = "\/ws"$/,/^ping_interval/s/^ping_interval = "0s"$/ping_interval = "30s"/' \
    "$dir/optional.toml" >"$dir/optional-ping.toml"
  local -a kinds=(off hs256 es256) idle=(anonymous authenticated)
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 3 $((r - 1))); do
      case ${kinds[$k]} in
        off) run auth-connect "off.r$r" "shardnet=off" --spawn --config "$dir/off.toml" --mode connect \
          --upgrade -c "$CONNECT_THREADS" "${pin[@]}" ;;
        hs256) run auth-connect "hs256.r$r" "shardnet=hs256" --spawn --config "$dir/hs256.toml" --mode connect \
          --mint "HS256:$dir/hs256.secret" -c "$CONNECT_THREADS" "${pin[@]}" ;;
        es256) run auth-connect "es256.r$r" "shardnet=es256" --spawn --config "$dir/es256.toml" --mode connect \
          --mint "ES256:$dir/es256.key" -c "$CONNECT_THREADS" "${pin[@]}" ;;
      esac
    done
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 2 $((r - 1))); do
      case ${idle[$k]} in
        anonymous) run auth-idle "anonymous.r$r" "shardnet=anonymous" --spawn --config "$dir/optional.toml" \
          --mode idle --idle-ws --path /ws -c "$CONNECTIONS" "${pin[@]}" ;;
        authenticated) run auth-idle "authenticated.r$r" "shardnet=authenticated" --spawn --config "$dir/optional.toml" \
          --mode idle --idle-ws --path /ws --mint "ES256:$dir/es256.key" -c "$CONNECTIONS" "${pin[@]}" ;;
      esac
    done
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for k in $(rotate 2 $((r - 1))); do
      case ${idle[$k]} in
        anonymous) run auth-idle-ping "anonymous.r$r" "shardnet=anonymous" --spawn --config "$dir/optional-ping.toml" \
          --mode idle --idle-ws --path /ws -c "$CONNECTIONS" "${pin[@]}" ;;
        authenticated) run auth-idle-ping "authenticated.r$r" "shardnet=authenticated" --spawn --config "$dir/optional-ping.toml" \
          --mode idle --idle-ws --path /ws --mint "ES256:$dir/es256.key" -c "$CONNECTIONS" "${pin[@]}" ;;
      esac
    done
  done
}

start=$SECONDS
for s in "${sections[@]}"; do
  if [[ $s == tls || $s == auth ]] && ! have openssl; then
    note "openssl not installed (apt-get install openssl): the $s section (certificate, keys) is skipped"
    continue
  fi
  manifest=$out/manifest-$s.tsv
  : >"$manifest"
  rm -f "$out"/"$s"*.json "$out"/"$s"*.txt
  "section_$s"
done
echo "ran ${sections[*]} in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s" >&2

if ! have python3; then
  note "python3 not installed: no summary; the reports are in $out/*.json"
  exit 0
fi

# The summary, from every section's manifest present (a section run earlier keeps its rows):
# per row and variant, the median of each figure with its spread [min-max] over the runs, then
# the ratios (or differences) of medians that the issue asks for.
python3 - "$out" "$SUBSCRIBERS" "$RATE" "$CONNECTIONS" <<'PY' | tee "$out/summary.txt"
import glob, json, os, statistics, sys

out, subs, rate, conns = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def fan(m, key):
    f = m.get("fanout") or {}
    return f.get(key)

def per(m, v):  # a rate over the run's seconds
    return v / m["seconds"] if v is not None and m.get("seconds") else None

def lat_ms(m, q):
    v = (m.get("latency_us") or {}).get(q)
    return v / 1000 if v is not None else None

def wire_per_delivery(m):
    # Bytes the subscribers read (frames as sent, compressed or not) per delivery.
    d = m.get("requests") or 0
    return m["megabytes_per_second"] * 1e6 * m["seconds"] / d if d else None

def cpu_us_per(m):
    pc = m.get("per_core_throughput")
    return 1e6 / pc if pc else None

idle_bytes = lambda m: (m.get("memory") or {}).get("user_bytes_per_connection")
rps = lambda m: m.get("requests_per_second")
pcore = lambda m: m.get("per_core_throughput")
mbps = lambda m: m.get("megabytes_per_second")

M = {  # name: (function, format)
    "deliveries/s": (lambda m: per(m, fan(m, "delivered")), "si"),
    "p50 ms": (lambda m: lat_ms(m, "p50"), "ms"),
    "p99 ms": (lambda m: lat_ms(m, "p99"), "ms"),
    "lost": (lambda m: fan(m, "lost"), "int"),
    "B/conn": (idle_bytes, "int"),
    "deliveries/CPU-s": (pcore, "si"),
    "wire MB/s": (mbps, "f1"),
    "wire B/delivery": (wire_per_delivery, "int"),
    "msg/s": (rps, "si"),
    "msg/CPU-s": (pcore, "si"),
    "p99 us": (lambda m: (m.get("latency_us") or {}).get("p99"), "int"),
    "handshakes/s": (rps, "si"),
    "handshakes/CPU-s": (pcore, "si"),
    "req/s": (rps, "si"),
    "req/CPU-s": (pcore, "si"),
    "conn/s": (rps, "si"),
    "conn/CPU-s": (pcore, "si"),
    "CPU us/conn": (cpu_us_per, "f1"),
}

# row: (title, variants in order, figures, comparisons (figure, baseline variant, ratio|diff))
ROWS = {
    "broker": (f"fan-out through a broker (issue 13): {subs} subscribers x {rate} publishes/s; in-process = 1 process, redis/nats = 2 processes on the server cores",
               ["in-process", "redis", "nats"], ["deliveries/s", "p50 ms", "p99 ms", "lost"],
               [("deliveries/s", "in-process", "ratio"), ("p99 ms", "in-process", "diff")]),
    "deflate-idle": (f"idle WebSocket connections (issue 14): {conns} held, server user memory (PSS) growth per connection",
                     ["plain", "shared", "dedicated"], ["B/conn"], [("B/conn", "plain", "diff"), ("B/conn", "plain", "ratio")]),
    "deflate-fanout": (f"fan-out of 1 KiB JSON (issue 14): {subs} subscribers x {rate} publishes/s, compressed (shared) vs plain",
                       ["plain", "deflate"], ["deliveries/s", "deliveries/CPU-s", "wire MB/s", "wire B/delivery", "p99 ms", "lost"],
                       [("deliveries/CPU-s", "plain", "ratio"), ("wire B/delivery", "plain", "ratio")]),
    "deflate-echo-q40": ("WebSocket echo of 1 KiB JSON (issue 14): 50 connections x 4 in flight, server at 40% of a core",
                         ["plain", "deflate"], ["msg/s", "msg/CPU-s", "p99 us", "wire MB/s"],
                         [("msg/s", "plain", "ratio"), ("msg/CPU-s", "plain", "ratio")]),
    "tls-idle": (f"idle TLS 1.3 connections (issue 18): {conns} held, server user memory (PSS) growth per connection",
                 ["shardnet-tls", "nginx-tls"], ["B/conn"], [("B/conn", "nginx-tls", "ratio")]),
    "tls-handshake": ("full TLS 1.3 handshakes (issue 18): connect mode, one GET per connection, no resumption",
                      ["shardnet-tls", "nginx-tls"], ["handshakes/s", "handshakes/CPU-s"], [("handshakes/CPU-s", "nginx-tls", "ratio")]),
    "tls-https-q40": ("/plaintext pipelined x16, 256 connections, server at 40% of a core (issue 18)",
                      ["shardnet-https", "nginx-https", "shardnet-http", "nginx-http"], ["req/s", "req/CPU-s"],
                      [("req/CPU-s", "nginx-https", "ratio"), ("req/CPU-s", "shardnet-http", "ratio")]),
    "tls-wss-q40": ("WebSocket echo 64 B, 100 connections, server at 40% of a core (issue 18): WSS vs WS",
                    ["wss", "ws"], ["msg/s", "msg/CPU-s", "p99 us"], [("msg/s", "ws", "ratio"), ("msg/CPU-s", "ws", "ratio")]),
    "tls-wss": ("WebSocket echo 64 B, 100 connections, uncapped (issue 18): WSS vs WS",
                ["wss", "ws"], ["msg/s", "msg/CPU-s", "p99 us"], [("msg/s", "ws", "ratio"), ("msg/CPU-s", "ws", "ratio")]),
    "auth-connect": ("connect + WebSocket upgrade per connection (issue 19): a token verified per connection vs auth off",
                     ["off", "hs256", "es256"], ["conn/s", "conn/CPU-s", "CPU us/conn"],
                     [("conn/CPU-s", "off", "ratio"), ("CPU us/conn", "off", "diff")]),
    "auth-idle": (f"idle WebSocket connections on /ws, auth optional (issue 19): {conns} held, with an ES256 token (own subject each) vs none",
                  ["anonymous", "authenticated"], ["B/conn"], [("B/conn", "anonymous", "diff")]),
    "auth-idle-ping": (f"the same with the default 30-s ping on /ws (issue 19): {conns} held, every connection with a timer",
                       ["anonymous", "authenticated"], ["B/conn"], [("B/conn", "anonymous", "diff")]),
}

def fmt(v, kind):
    if v is None:
        return "n/a"
    if kind == "si":
        a = abs(v)
        return f"{v/1e6:.3g}M" if a >= 1e6 else f"{v/1e3:.3g}k" if a >= 1e3 else f"{v:.3g}"
    if kind == "ms":
        return f"{v:.2f}"
    if kind == "f1":
        return f"{v:.1f}"
    return f"{v:.0f}"

runs, missing = {}, {}  # (row, variant) -> [measurement]; (row, variant) -> [report file]
for path in sorted(glob.glob(os.path.join(out, "manifest-*.tsv"))):
    for line in open(path):
        row, variant, report, label = line.rstrip("\n").split("\t")
        key = (row, variant)
        runs.setdefault(key, [])
        try:
            ms = [m for m in json.load(open(report))["runs"] if m["label"] == label]
        except (OSError, ValueError, KeyError):
            ms = []
        if not ms:
            missing.setdefault(key, []).append(os.path.basename(report))
        runs[key].extend(ms)

summary, any_row = {}, False
for row, (title, variants, figures, comparisons) in ROWS.items():
    present = [v for v in variants if (row, v) in runs]
    if not present:
        continue
    any_row = True
    print(f"\n== {row}: {title}")
    comp_cols = [f"{f} {'/' if k == 'ratio' else '-'} {b}" for f, b, k in comparisons]
    med, cells = {}, {}
    for v in present:
        ms = runs[(row, v)]
        med[v], cells[v] = {}, []
        for f in figures:
            fn, kind = M[f]
            vals = [x for x in (fn(m) for m in ms) if x is not None]
            if not vals:
                cells[v].append("n/a")
                continue
            md = med[v][f] = statistics.median(vals)
            spread = f" [{fmt(min(vals), kind)}-{fmt(max(vals), kind)}]" if len(vals) > 1 else ""
            cells[v].append(fmt(md, kind) + spread)
    lines = []
    for v in present:
        ms = runs[(row, v)]
        errors = sum(m.get("errors", 0) for m in ms)
        comps = []
        for f, b, k in comparisons:
            x, y = med[v].get(f), med.get(b, {}).get(f)
            if x is None or y is None:
                comps.append("n/a")
            elif k == "ratio":
                comps.append(f"{x / y:.3f}" if y else "n/a")
            else:
                comps.append(fmt(x - y, M[f][1]))
        lines.append([v, str(len(ms))] + cells[v] + [str(errors)] + comps)
        summary.setdefault(row, {})[v] = {"runs": len(ms), "errors": errors, "medians": med[v],
                                          "comparisons": dict(zip(comp_cols, comps))}
        if errors:
            first = next((m.get("first_error") for m in ms if m.get("first_error")), None)
            lines.append(f"  {v}: first error: {first}")
        if (row, v) in missing:
            lines.append(f"  {v}: no result in {', '.join(missing[(row, v)])} (the run failed: see the .txt beside it)")
    table = [["", "runs"] + figures + ["errors"] + comp_cols] + [l for l in lines if isinstance(l, list)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for l in [table[0]] + lines:
        if isinstance(l, str):
            print(l)
        else:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
if not any_row:
    print("no results (see the notes above and the .txt files in " + out + ")")
notes = open(os.path.join(out, "notes.txt")).read().strip()
if notes:
    print("\n" + notes)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
