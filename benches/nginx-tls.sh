#!/bin/sh
# nginx terminating TLS, as a comparison server for `shardnet bench --compare ... --tls`: one
# process (master_process off, so the cgroup quota and the pinning hold all of its work), TLS 1.3
# only, `return 200 "Hello, World!"`, access log off; otherwise nginx's TLS defaults (session
# tickets on, no session cache: the bench's connect mode never resumes, so every connection is a
# full handshake either way).
#
#   benches/nginx-tls.sh PORT [CERT KEY]
#
# Without CERT and KEY it makes a self-signed P-256 certificate for `localhost` with openssl in
# its temporary directory (give the bench that cert.pem as --tls-ca). benches/features.sh passes
# the certificate it gave the spawned shardnet, so both servers do the same signature per
# handshake. The temporary directory is made under $TMPDIR (default /tmp); it outlives nginx
# (exec), so whoever sets TMPDIR removes it (benches/features.sh does).
# Debian's nginx-light provides /usr/sbin/nginx (built with OpenSSL).
set -eu
port=${1:?usage: benches/nginx-tls.sh PORT [CERT KEY]}
[ -x /usr/sbin/nginx ] || { echo "benches/nginx-tls.sh: /usr/sbin/nginx not found (Debian/Ubuntu: apt-get install nginx-light)" >&2; exit 1; }
dir=$(mktemp -d "${TMPDIR:-/tmp}/shardnet-nginx-tls.XXXXXX")
if [ $# -ge 3 ]; then
  cert=$2 key=$3
else
  command -v openssl >/dev/null || { echo "benches/nginx-tls.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }
  cert=$dir/cert.pem key=$dir/key.pem
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE -keyout "$key" -out "$cert" 2>/dev/null
fi
cat > "$dir/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
# 15,000 idle connections and then some, under a 20,000-descriptor limit.
worker_rlimit_nofile 20000;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 19000; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $dir;
  server {
    listen 127.0.0.1:$port ssl reuseport backlog=4096;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.3;
    location / {
      default_type text/plain;
      return 200 "Hello, World!";
    }
  }
}
CONF
exec /usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf"
