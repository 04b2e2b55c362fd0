#!/bin/sh
# nginx as a comparison server for `shardnet bench --compare`: one process (master_process off,
# so the cgroup quota and the pinning hold all of its work), `return 200 "Hello, World!"`, access
# log off. Usage: benches/nginx.sh PORT  (Debian's nginx-light provides /usr/sbin/nginx).
set -eu
port=${1:?usage: benches/nginx.sh PORT}
[ -x /usr/sbin/nginx ] || { echo "benches/nginx.sh: /usr/sbin/nginx not found (Debian/Ubuntu: apt-get install nginx-light)" >&2; exit 1; }
dir=$(mktemp -d "${TMPDIR:-/tmp}/shardnet-nginx.XXXXXX")
cat > "$dir/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $dir;
  server {
    listen 127.0.0.1:$port reuseport backlog=4096;
    location / {
      default_type text/plain;
      return 200 "Hello, World!";
    }
  }
}
CONF
exec /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf"
