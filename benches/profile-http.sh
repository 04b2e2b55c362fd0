#!/usr/bin/env bash
# benches/profile-http.sh (root for perf; about 30 s): where HTTP pipelined x16 time goes,
# shardnet vs limit-http.c, each pinned to core 0 (uncapped), wrk on core 1, perf record of the server for 5 s; prints the top symbols and the user/kernel split.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
[ -x target/release/shardnet ] || { echo "profile-http.sh: build first: cargo build --release" >&2; exit 1; }
[ -x bench-out/limit-http ] || gcc -O2 -o bench-out/limit-http ../shared/reference/limit-http.c || { echo "profile-http.sh: needs gcc and ../shared/reference/limit-http.c" >&2; exit 1; }
command -v perf >/dev/null && command -v wrk >/dev/null || { echo "profile-http.sh: needs perf (linux-perf) and wrk" >&2; exit 1; }
out=bench-out/profile; mkdir -p $out
cat > $out/serve.toml <<TOML
[server]
shards = 1
pin = false
[limits]
idle_timeout = "0s"
[[listener]]
name = "http"
addr = "127.0.0.1:18080"
service = "http"
TOML
prof() { # name, pid
  local name=$1 pid=$2
  sleep 1
  taskset -c 1 wrk -t1 -c256 -d8s -s benches/pipeline.lua http://127.0.0.1:18080/plaintext -- 16 > $out/$name.wrk &
  local w=$!
  sleep 2
  perf record -F 2000 -g -p $pid -o $out/$name.data -- sleep 5 2>/dev/null >/dev/null
  wait $w
  kill $pid; wait $pid 2>/dev/null
  grep -E "Requests/sec" $out/$name.wrk
  perf report -i $out/$name.data --no-children --sort dso,sym --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -25 > $out/$name.top
  perf report -i $out/$name.data --no-children --sort dso --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -6
}
taskset -c 0 target/release/shardnet serve --config $out/serve.toml > $out/shardnet.log 2>&1 &
prof shardnet $!
taskset -c 0 bench-out/limit-http --port 18080 > $out/c.log 2>&1 &
prof limit-http $!
echo "== shardnet top"; cat $out/shardnet.top
echo "== limit-http top"; cat $out/limit-http.top
