#!/usr/bin/env bash
# How close shardnet comes to the practical per-core ceilings of ../shared/reference (issue 20):
# HTTP pipelined x16 (wrk, 256 connections) against limit-http.c, WebSocket echo at depth 16
# (100 connections, 64-byte messages) against limit-ws.c, and TCP echo at depth 16 against
# limit-echo.c as a control (a load where shardnet's own code is a small part of the cost).
#
#   [NEW=target/release/shardnet] [OLD=path/to/an/earlier/shardnet] [ROUNDS=5] \
#   [DURATION=4s] [WARMUP=1s] benches/ceiling.sh
#
# It builds no Rust: NEW (and OLD, when that file exists) are binaries built beforehand
# (`cargo build --release`). The C references are compiled with `gcc -O2` into bench-out/ when
# they are not there yet (limit-ws needs libcrypto: libssl-dev).
#
# Each load is one `shardnet bench --compare` run (NEW's bench: the same client for every
# server): NEW spawned by the bench, the C reference and OLD as --compare commands, each server
# in turn pinned to core 0 and capped at 40% of it by a cgroup CPU quota (--server-quota 40:
# needs root), the client on core 1, the servers alternating within each round (the first slot
# rotates), ROUNDS rounds. Printed per load: each server's median req/s and its spread
# (min-max over the rounds), then the ratios new/C and new/old, both as the ratio of the
# medians and as the median [min-max] of the per-round ratios. Everything goes to
# bench-out/ceiling.json (the bench's own reports beside it: bench-out/ceiling-*.json).
#
# Bounded: with the defaults about 5 minutes (3 loads x 3 servers x 5 rounds x ~6.5 s), each
# bench run stopped after 3 x ROUNDS x (DURATION + WARMUP + 4 s) + 15 s (150 s with the
# defaults, so never more than 7.5 minutes in all) whatever happens; every process it starts is stopped by pid on exit (the servers
# and clients the bench spawns die with it).
#
# Internal: `benches/ceiling.sh --serve-old PORT echo|http` runs OLD on PORT (what --compare
# starts; the bench caps and pins it like the others).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench-out
NEW=${NEW:-target/release/shardnet}
OLD=${OLD:-}

if [ "${1:-}" = --serve-old ]; then
  port=$2 kind=$3
  cfg=$out/ceiling-old-$port.toml
  # The shape of the bench's generated configuration (src/bench/spawn.rs), which OLD reads too.
  {
    printf '[server]\nshards = 1\npin = true\nstats_interval = "0s"\nshutdown_timeout = "2s"\n\n'
    printf '[limits]\nidle_timeout = "0s"\n\n'
    printf '[[listener]]\nname = "%s"\naddr = "127.0.0.1:%s"\nservice = "%s"\nbacklog = 65535\n' "$kind" "$port" "$kind"
    if [ "$kind" = http ]; then
      printf '\n[[listener.websocket]]\npath = "/ws/echo"\nmode = "echo"\nping_interval = "0s"\n'
    fi
  } >"$cfg"
  exec "$OLD" serve --config "$cfg"
fi

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4s}
WARMUP=${WARMUP:-1s}
mkdir -p "$out"
fail() { echo "ceiling.sh: $*" >&2; exit 2; }
[ -x "$NEW" ] || fail "NEW=$NEW is not an executable file: build it first (cargo build --release)"
[ "$(id -u)" = 0 ] || fail "the 40% cap is a cgroup CPU quota, which needs root"
command -v wrk >/dev/null || fail "the HTTP load needs wrk (apt-get install wrk)"
command -v python3 >/dev/null || fail "the summary needs python3"
if [ -n "$OLD" ] && [ -x "$OLD" ]; then
  have_old=1
else
  have_old=0
  echo "note: OLD=${OLD:-(not set)} is not an executable: no new/old ratios (build an earlier commit with cargo build --release and give its path)" >&2
fi

# The C references, compiled once into bench-out/.
refs=../shared/reference
for name in limit-echo limit-http limit-ws; do
  [ -x "$out/$name" ] && continue
  [ -f "$refs/$name.c" ] || fail "$refs/$name.c not found (the project's shared folder, beside this repository)"
  command -v gcc >/dev/null || fail "gcc is needed for the C references (apt-get install gcc)"
  libs=()
  [ "$name" = limit-ws ] && libs=(-lcrypto)
  gcc -O2 -o "$out/$name" "$refs/$name.c" "${libs[@]}"
done

bench_pid=
stop() {
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    # The bench under `timeout`: its pid names the cgroups it made, which a bench ended by a
    # signal leaves behind (empty: its servers die with it), so they are removed here.
    local kids
    kids=$(ps -o pid= --ppid "$bench_pid" || true)
    kill "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
    sleep 0.5
    for k in $kids; do
      for d in /sys/fs/cgroup/cpu/shardnet-bench-"$k"-* /sys/fs/cgroup/unified/shardnet-bench-"$k"-* \
        /sys/fs/cgroup/shardnet-bench-"$k"-*; do
        [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
      done
    done
  fi
  rm -f "$out"/ceiling-old-*.toml
}
trap stop EXIT
trap 'exit 130' INT TERM

common=(--server-cores 0 --client-cores 1 --server-quota 40 --rounds "$ROUNDS"
  --warmup "$WARMUP" --duration "$DURATION")
# The bound of one bench run: its 3 x ROUNDS measurements with 4 s each to start and stop, and
# 15 s to spare (150 s with the defaults, where a run takes about 100 s; 600 s when the
# durations are not whole seconds like `4s`).
secs() { [[ $1 =~ ^([0-9]+)s$ ]] && echo "${BASH_REMATCH[1]}"; }
if d=$(secs "$DURATION") && w=$(secs "$WARMUP"); then
  limit=$((3 * ROUNDS * (d + w + 4) + 15))
else
  limit=600
fi
self=$PWD/benches/ceiling.sh

# load NAME C-REFERENCE OLD-LISTENER BENCH-ARGS...: one --compare run.
load() {
  local name=$1 ref=$2 kind=$3
  shift 3
  local cmp=(--compare "$PWD/$out/$ref --port {port}" --compare-name "C-$ref")
  if [ "$have_old" = 1 ]; then
    cmp+=(--compare "env OLD=$OLD $self --serve-old {port} $kind" --compare-name old)
  fi
  echo "== $name" >&2
  # In the background so that `stop` can end it by pid; timeout bounds it whatever happens.
  timeout "$limit" "$NEW" bench "$@" "${common[@]}" "${cmp[@]}" --json "$out/ceiling-$name.json" \
    >"$out/ceiling-$name.txt" 2>&1 &
  bench_pid=$!
  local rc=0
  wait "$bench_pid" || rc=$?
  bench_pid=
  sed -n '/^median/,$p' "$out/ceiling-$name.txt" >&2
  [ "$rc" = 0 ] || echo "note: $name: the bench exited $rc (see $out/ceiling-$name.txt)" >&2
}

load http-pipelined-16 limit-http http --mode http --wrk -c 256 -d 16
load ws-echo-depth-16 limit-ws http --mode ws -c 100 -d 16 -s 64
load echo-depth-16 limit-echo echo --mode echo -c 50 -d 16 -s 64

python3 - "$out" "$ROUNDS" "$DURATION" <<'EOF'
import json, os, sys

out, rounds, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loads = [("http-pipelined-16", "C-limit-http"), ("ws-echo-depth-16", "C-limit-ws"),
         ("echo-depth-16", "C-limit-echo")]

def median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else None  # the upper middle, as the bench's own median

def spread(v):
    return [min(v), max(v)] if v else None

result = {"rounds": rounds, "duration": duration, "server_quota_percent": 40,
          "server_core": 0, "client_core": 1, "loads": {}}
for name, ref in loads:
    path = os.path.join(out, f"ceiling-{name}.json")
    if not os.path.exists(path):
        result["loads"][name] = {"error": f"no report ({path})"}
        continue
    runs = json.load(open(path)).get("runs", [])
    # Runs in order: each round runs every server once. A round where one failed is left out
    # of the per-round ratios (its runs still count in the medians).
    per_round = {}
    names = []
    for m in runs:
        label = m["label"]
        if label not in names:
            names.append(label)
    per_server = {n: [m["requests_per_second"] for m in runs if m["label"] == n] for n in names}
    seen = {n: 0 for n in names}
    for m in runs:
        r = seen[m["label"]]
        seen[m["label"]] += 1
        per_round.setdefault(r, {})[m["label"]] = m["requests_per_second"]
    entry = {"servers": {}, "ratios": {}}
    for n in names:
        v = per_server[n]
        entry["servers"][n] = {"median_rps": median(v), "min_max_rps": spread(v), "runs_rps": v}
    for other, key in ((ref, "new_over_c"), ("old", "new_over_old")):
        if other not in per_server or "shardnet" not in per_server:
            continue
        rs = [r["shardnet"] / r[other] for r in per_round.values()
              if "shardnet" in r and r.get(other)]
        mo = median(per_server[other])
        entry["ratios"][key] = {
            "of_medians": median(per_server["shardnet"]) / mo if mo else None,
            "per_round_median": median(rs),
            "per_round_min_max": spread(rs),
        }
    result["loads"][name] = entry

json.dump(result, open(os.path.join(out, "ceiling.json"), "w"), indent=2)

def f(x, fmt):
    return "-" if x is None else format(x, fmt)

print(f"\nceiling: server capped at 40% of core 0, client on core 1, {rounds} rounds of {duration}")
for name, e in result["loads"].items():
    print(f"\n{name}")
    if "error" in e:
        print(f"  {e['error']}")
        continue
    for n, s in e["servers"].items():
        lo, hi = s["min_max_rps"] or (None, None)
        print(f"  {n:<14} median {f(s['median_rps'], '>10.0f')} req/s   spread {f(lo, '.0f')}-{f(hi, '.0f')}")
    for key, r in e["ratios"].items():
        lo, hi = r["per_round_min_max"] or (None, None)
        print(f"  {key:<14} {f(r['of_medians'], '.3f')} (of medians); per round {f(r['per_round_median'], '.3f')} [{f(lo, '.3f')}-{f(hi, '.3f')}]")
print(f"\nwritten: {out}/ceiling.json")
EOF
