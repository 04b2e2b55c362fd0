#!/usr/bin/env bash
# Checks deploy/: the systemd unit verifies, the Kubernetes manifests parse and carry what an
# operator relies on, the sysctl file is well formed, the haproxy config is valid, and the TOML
# in the ConfigMap is the checked-in one and passes `shardnet config check`.
# Needs: systemd-analyze (Debian: systemd), haproxy, python3 with PyYAML (Debian: python3-yaml),
# and a built shardnet binary (SHARDNET=path, default target/debug/shardnet).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDNET=${SHARDNET:-target/debug/shardnet}
fail=0
ok() { echo "ok: $*"; }
bad() { echo "FAIL: $*"; fail=1; }

# 1. systemd unit: verify a copy whose ExecStart points at the built binary (verify insists
#    that the executable exists).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/local/bin/shardnet|$(realpath "$SHARDNET")|" deploy/systemd/shardnet.service > "$tmp/shardnet.service"
# Any message from verify (a bad directive, an unknown setting) fails the check.
if out=$(systemd-analyze verify "$tmp/shardnet.service" 2>&1) && [ -z "$out" ]; then
  ok "systemd-analyze verify"
else
  bad "systemd-analyze verify: $out"
fi
for key in Type=notify LimitNOFILE=1048576 Restart=on-failure NoNewPrivileges=yes ProtectSystem=strict DynamicUser=yes ExecReload= NotifyAccess=all RuntimeDirectory=shardnet; do
  grep -q "^$key" deploy/systemd/shardnet.service && ok "unit has $key" || bad "unit lacks $key"
done
# Reload is the hand-over to a new process (restart without dropping a connection).
grep -q '^ExecReload=.*shardnet upgrade --config' deploy/systemd/shardnet.service \
  && ok "reload runs shardnet upgrade" || bad "ExecReload does not run shardnet upgrade"

# 2. sysctl: every non-comment line is `key = value`, and the keys a million connections need.
if awk '!/^[[:space:]]*(#|$)/ && !/^[a-z0-9_.-]+ = [^=]+$/ {print "bad line: " $0; bad=1} END {exit bad}' deploy/sysctl.d/90-shardnet.conf; then
  ok "sysctl file syntax"
else
  bad "sysctl file syntax"
fi
for key in fs.nr_open fs.file-max net.core.somaxconn net.ipv4.tcp_mem net.ipv4.ip_local_port_range net.netfilter.nf_conntrack_max; do
  grep -q "^$key = " deploy/sysctl.d/90-shardnet.conf && ok "sysctl sets $key" || bad "sysctl lacks $key"
done

# 3. Kubernetes manifests.
python3 - <<'PY' || fail=1
import sys, yaml, pathlib
docs = {}
for p in sorted(pathlib.Path("deploy/k8s").glob("*.yaml")):
    for d in yaml.safe_load_all(p.read_text()):
        docs[d["kind"]] = d
        print(f"ok: {p} parses ({d['kind']})")
def need(cond, what):
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond: need.failed = True
need.failed = False
dep = docs["Deployment"]["spec"]["template"]["spec"]
c = dep["containers"][0]
req, lim = c["resources"]["requests"], c["resources"]["limits"]
need(req["cpu"] == lim["cpu"], "CPU requests equal limits")
need(float(req["cpu"]).is_integer(), "CPU in whole cores")
need(c["readinessProbe"]["httpGet"]["path"] == "/healthz", "readiness probe on /healthz")
need(dep["terminationGracePeriodSeconds"] > 15, "termination grace period covers preStop + shutdown_timeout")
need("preStop" in c["lifecycle"], "preStop hook")
need(dep["securityContext"]["runAsNonRoot"] is True, "runs as non-root")
mounts = {m["name"] for m in c["volumeMounts"]}
vols = {v["name"]: v for v in dep["volumes"]}
need(any("configMap" in vols[m] and vols[m]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"] for m in mounts), "ConfigMap mounted")
svc = docs["Service"]["spec"]
need({p["port"] for p in svc["ports"]} >= {7000, 8080}, "Service exposes 7000 and 8080")
cm = docs["ConfigMap"]["data"]["shardnet.toml"]
import re
sock = re.search(r'^control_socket = "([^"]+)"', cm, re.M)
need(sock is not None, "the pod's configuration sets server.control_socket (shardnet upgrade)")
if sock:
    d = str(pathlib.PurePosixPath(sock.group(1)).parent)
    need(any(m["mountPath"] == d and "emptyDir" in vols[m["name"]] for m in c["volumeMounts"]),
         f"{d}, the control socket's directory, is a writable volume")
need(cm == pathlib.Path("deploy/k8s/shardnet.toml").read_text(), "ConfigMap TOML identical to deploy/k8s/shardnet.toml")
sys.exit(1 if need.failed else 0)
PY
if "$SHARDNET" config check deploy/k8s/shardnet.toml >/dev/null; then ok "shardnet config check deploy/k8s/shardnet.toml"; else bad "config check"; fi

# 3b. Kubernetes: shardnet replicas against a broker (deploy/k8s/broker).
python3 - <<'PY' || fail=1
import sys, yaml, pathlib, re
docs = {}
for p in sorted(pathlib.Path("deploy/k8s/broker").glob("*.yaml")):
    for d in yaml.safe_load_all(p.read_text()):
        docs[(d["kind"], d["metadata"]["name"])] = d
        print(f"ok: {p} parses ({d['kind']} {d['metadata']['name']})")
def need(cond, what):
    print(("ok: " if cond else "FAIL: ") + what)
    if not cond: need.failed = True
need.failed = False
dep = docs[("Deployment", "shardnet")]
need(dep["spec"]["replicas"] >= 2, "several shardnet replicas share the broker")
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
need(c["readinessProbe"]["httpGet"]["path"] == "/healthz", "readiness probe on /healthz")
need(pod["securityContext"]["runAsNonRoot"] is True, "shardnet runs as non-root")
secret_name = next(v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v)
toml = docs[("Secret", secret_name)]["stringData"]["shardnet.toml"]
need(toml == pathlib.Path("deploy/k8s/broker/shardnet.toml").read_text(),
     "config Secret TOML identical to deploy/k8s/broker/shardnet.toml")
url = re.search(r'^url = "([^"]+)"', toml, re.M).group(1)
host = re.match(r"[a-z]+://(?:[^@/]*@)?([^:/]+)", url).group(1)
need(("Service", host) in docs, f"the broker url's host ({host}) is a Service of the example")
broker = docs[("Deployment", host)]["spec"]["template"]["spec"]["containers"][0]
need("--save" in broker["args"] and "--appendonly" in broker["args"], "broker without persistence")
need("--requirepass" in broker["args"], "broker requires a password")
sys.exit(1 if need.failed else 0)
PY
if out=$("$SHARDNET" config check deploy/k8s/broker/shardnet.toml) && ! grep -q change-me <<<"$out"; then
  ok "shardnet config check deploy/k8s/broker/shardnet.toml (password not printed)"
else
  bad "config check deploy/k8s/broker/shardnet.toml"
fi

# 4. haproxy.
if haproxy -c -f deploy/haproxy/haproxy.cfg >/dev/null 2>&1; then ok "haproxy -c"; else bad "haproxy -c: $(haproxy -c -f deploy/haproxy/haproxy.cfg 2>&1 | tail -3)"; fi

# 5. Containerfile: multi-stage and non-root (no engine here to build it).
grep -q '^FROM .* AS build' deploy/container/Containerfile && grep -q '^USER [1-9]' deploy/container/Containerfile \
  && ok "Containerfile is multi-stage and non-root" || bad "Containerfile"

exit $fail
