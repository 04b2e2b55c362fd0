#!/usr/bin/env python3
"""Helpers of benches/soak.sh (standard library only): learn a server's addresses from its
readiness datagram, sample its memory and gauges, time a latency probe, fetch an admin page, and
write the summary table and JSON of a soak. Every loop here is bounded in time.

    soak.py ready SOCKET OUT TIMEOUT       one sd_notify datagram -> "name addr" lines in OUT
    soak.py sample --pid P --admin A --seconds S --out F
    soak.py probe --http A --seconds S --out F
    soak.py get URL [--out F]              prints the status; the body goes to F
    soak.py report --dir D --json F ...    the summary (see soak.sh)
"""

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import time

REQ = b"GET /plaintext HTTP/1.1\r\nHost: soak\r\n\r\n"


def now():
    return time.monotonic()


def ready(path, out, timeout):
    """Binds `path`, waits for the datagram with READY=1, writes its listeners."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    deadline = now() + float(timeout)
    while True:
        left = deadline - now()
        if left <= 0:
            print(f"no readiness announcement within {timeout} s", file=sys.stderr)
            return 1
        s.settimeout(left)
        try:
            lines = s.recv(1 << 16).decode().splitlines()
        except socket.timeout:
            continue
        if "READY=1" in lines:
            with open(out, "w") as f:
                for line in lines:
                    if line.startswith("SHARDNET_LISTENER="):
                        f.write(line.split("=", 1)[1] + "\n")
            return 0


def fetch(address, path, timeout=3.0):
    host, _, port = address.rpartition(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def proc_status(pid):
    """VmRSS and VmHWM of `pid` in bytes, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None
    kib = lambda k: int(fields[k].split()[0]) * 1024 if k in fields else 0
    return kib("VmRSS"), kib("VmHWM")


def sample(a):
    """RSS every 0.5 s, the server's gauges from /stats every 2 s, until --seconds or SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    start = now()
    res = {"rss_peak": 0, "hwm": 0, "series": [], "stats_ok": 0, "stats_failed": 0,
           "gauge_peaks": {}, "alive": True}
    next_stats = next_point = start
    while not stop and now() < start + a.seconds:
        st = proc_status(a.pid)
        if st is None:
            res["alive"] = False
            break
        rss, hwm = st
        res["rss_peak"] = max(res["rss_peak"], rss)
        res["hwm"] = max(res["hwm"], hwm)
        if now() >= next_point:
            res["series"].append([round(now() - start, 1), rss])
            next_point += 5
        if now() >= next_stats:
            next_stats = now() + 2
            try:
                _, body = fetch(a.admin, "/stats", timeout=2)
                v = json.loads(body)
                gauges = {k: v["total"][k] for k in ("open", "output_queued", "input_buffered")}
                gauges["ws_open"] = v["services_total"]["ws_open"]
                gauges["open_fds"] = v["process"]["open_fds"] or 0
                for k, x in gauges.items():
                    res["gauge_peaks"][k] = max(res["gauge_peaks"].get(k, 0), x)
                res["stats_ok"] += 1
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                # At the descriptor limit the admin listener waits in the backlog too.
                res["stats_failed"] += 1
        time.sleep(0.5)
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


def probe(a):
    """One keep-alive HTTP connection, one request every --interval, each timed from its
    intended send time (a late answer delays the next sends, and they are charged for it)."""
    host, _, port = a.http.rpartition(":")
    lat, errors, first_error = [], 0, None
    # Answers slower than 20 ms, with the wall-clock time of their intended send (to line up
    # with the abusers' EMFILE phases): the first 1000.
    slow = []
    s = None
    start = now()
    i = 0
    while True:
        intended = start + i * a.interval
        if intended > start + a.seconds:
            break
        i += 1
        time.sleep(max(0, intended - now()))
        try:
            if s is None:
                s = socket.create_connection((host, int(port)), timeout=5)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            s.sendall(REQ)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end].decode("latin-1")
                    length = next(int(l.split(":", 1)[1]) for l in head.split("\r\n")
                                  if l.lower().startswith("content-length:"))
                    if len(buf) >= end + 4 + length:
                        status = int(head.split(" ", 2)[1])
                        buf = buf[end + 4 + length:]
                        break
                d = s.recv(65536)
                if not d:
                    raise EOFError("closed by the server")
                buf += d
            if status != 200:
                raise ValueError(f"status {status}")
            lat.append(now() - intended)
            if lat[-1] > 0.02:
                slow.append((round(time.time() - (now() - intended), 3), round(lat[-1] * 1e6)))
        except (OSError, EOFError, ValueError, StopIteration) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
            if s is not None:
                s.close()
            s = None
    if s is not None:
        s.close()
    lat.sort()
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else None
    with open(a.out, "w") as f:
        json.dump({"requests": len(lat), "errors": errors, "first_error": first_error,
                   "interval_s": a.interval, "slow_over_20ms": slow[:1000],
                   "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                                  "p999": pct(0.999), "max": pct(1.0)}}, f)
    return 0


def get(a):
    address, _, path = a.url.removeprefix("http://").partition("/")
    try:
        status, body = fetch(address, "/" + path, timeout=a.timeout)
    except (OSError, http.client.HTTPException) as e:
        print(f"error: {e}")
        return 1
    if a.out:
        with open(a.out, "wb") as f:
            f.write(body)
    print(status)
    return 0


# ---------------------------------------------------------------------------------------------
# The report.

ENGINE_LIMITS = ["idle_timeouts", "write_timeouts", "read_overflows", "backpressure_pauses",
                 "errors", "service_panics", "accept_pauses", "rejected"]
SERVICE_LIMITS = ["http_errors", "ws_protocol_closes", "ws_dropped", "ws_slow_closed",
                  "ws_reaped", "ws_fanout_lost", "ws_publish_refused", "ws_subscribe_refused"]
ACCEPTOR = ["accept_pauses", "paused_micros", "rejected_max_connections", "rejected_busy",
            "accept_errors"]


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def mib(b):
    return f"{b / (1 << 20):.1f} MiB" if b is not None else "n/a"


def ms(us):
    return f"{us / 1000:.2f} ms" if us is not None else "n/a"


def report(a):
    d = a.dir
    phases = ["baseline", "abuse"]
    out = {"commit": a.commit, "machine": a.machine, "minutes_per_run": a.minutes,
           "config": open(os.path.join(d, "soak.toml")).read(), "phases": {}}
    for p in phases:
        ph = {"load": {}}
        for mode in ("echo", "http", "ws"):
            b = load(os.path.join(d, f"{p}-{mode}.json"))
            r = b["runs"][0] if b and b.get("runs") else None
            ph["load"][mode] = None if r is None else {
                "connections": r["connections"], "requests": r["requests"],
                "requests_per_second": round(r["requests_per_second"], 1),
                "latency_us": r["latency_us"], "errors": r["errors"],
                "first_error": r["first_error"],
                "server_cpu_share": (round(r["server_cpu_seconds"] / r["seconds"], 3)
                                     if r.get("server_cpu_seconds") and r["seconds"] else None)}
        ph["probe"] = load(os.path.join(d, f"{p}-probe.json"))
        ph["samples"] = load(os.path.join(d, f"{p}-samples.json"), {})
        stats = load(os.path.join(d, f"{p}-stats.json"), {})
        ph["closed_by_limit"] = {
            **{k: stats.get("total", {}).get(k) for k in ENGINE_LIMITS},
            **{k: stats.get("services_total", {}).get(k) for k in SERVICE_LIMITS},
            **{f"acceptor_{k}": stats.get("acceptor", {}).get(k) for k in ACCEPTOR}}
        ph["health"] = open(os.path.join(d, f"{p}-health")).read().strip() \
            if os.path.exists(os.path.join(d, f"{p}-health")) else "n/a"
        ph["exit"] = open(os.path.join(d, f"{p}-exit")).read().strip() \
            if os.path.exists(os.path.join(d, f"{p}-exit")) else "n/a"
        ph["hwm"] = int(open(os.path.join(d, f"{p}-hwm")).read().strip() or 0) \
            if os.path.exists(os.path.join(d, f"{p}-hwm")) else None
        out["phases"][p] = ph
    abusers = load(os.path.join(d, "abuse-abusers.json"), {})
    out["abusers"] = abusers

    # The memory bound: what the configuration lets every connection the server can hold
    # keep, over what the same server used without the abusers.
    per_conn = a.max_write_buffer + a.overshoot + a.max_read_buffer
    base = out["phases"]["baseline"]
    baseline_peak = max(base["hwm"] or 0, base["samples"].get("hwm", 0))
    bound = baseline_peak + a.fd_limit * per_conn
    ab = out["phases"]["abuse"]
    abuse_peak = max(ab["hwm"] or 0, ab["samples"].get("hwm", 0))
    out["memory"] = {
        "baseline_peak_rss": baseline_peak, "abuse_peak_rss": abuse_peak,
        "per_connection_bound": per_conn, "connections_bound": a.fd_limit, "bound": bound,
        "how": (f"baseline peak RSS + {a.fd_limit} connections (the server's RLIMIT_NOFILE; "
                f"max_connections is set above it) x (max_write_buffer {a.max_write_buffer} + "
                f"{a.overshoot} (one read's answers or one pub/sub message past the bound) + "
                f"max_read_buffer {a.max_read_buffer})"),
        "under_bound": abuse_peak <= bound,
        "abuse_gauge_peaks": ab["samples"].get("gauge_peaks", {}),
    }
    crashes = sum(1 for p in phases if not out["phases"][p]["samples"].get("alive", False)
                  or out["phases"][p]["health"] != "200" or out["phases"][p]["exit"] != "0")
    out["crashes"] = crashes

    rows = []
    worst = 0.0
    for mode in ("echo", "http", "ws"):
        b, x = base["load"][mode], ab["load"][mode]
        bp = b and b["latency_us"]["p99"]
        xp = x and x["latency_us"]["p99"]
        ratio = xp / bp if bp and xp else None
        worst = max(worst, ratio or 0)
        rows.append((f"{mode} p99 (bench, {b['connections'] if b else '?'} conns, open loop)",
                     ms(bp), ms(xp), f"{ratio:.2f}" if ratio else "n/a",
                     f"{b['errors'] if b else 'n/a'} / {x['errors'] if x else 'n/a'}",
                     f"{b['requests_per_second'] if b else 'n/a'} / "
                     f"{x['requests_per_second'] if x else 'n/a'}"))
    bp, xp = base["probe"], ab["probe"]
    if bp and xp:
        r = (xp["latency_us"]["p99"] / bp["latency_us"]["p99"]
             if bp["latency_us"]["p99"] and xp["latency_us"]["p99"] else None)
        rows.append((f"http p99 (probe, 1 request / {bp['interval_s'] * 1000:.0f} ms)",
                     ms(bp["latency_us"]["p99"]), ms(xp["latency_us"]["p99"]),
                     f"{r:.2f}" if r else "n/a", f"{bp['errors']} / {xp['errors']}",
                     f"{bp['requests']} / {xp['requests']} requests"))
    out["p99_ratio_worst_bench"] = round(worst, 3)
    # Which of the probe's slow answers (over 20 ms) fell in a descriptor-exhaustion phase.
    phases_emfile = [(p["began"], p["released"] + 1) for p in
                     abusers.get("kinds", {}).get("descriptor_exhaustion", {}).get("detail", [])]
    slow = (xp or {}).get("slow_over_20ms", [])
    in_emfile = sum(1 for t, _ in slow if any(b <= t <= e for b, e in phases_emfile))
    out["probe_slow_in_emfile_phases"] = {"slow": len(slow), "in_phases": in_emfile,
                                          "phases": len(phases_emfile)}

    lines = []
    w = max(len(r[0]) for r in rows)
    lines.append(f"soak: {a.minutes} min per run, commit {a.commit}, {a.machine}")
    lines.append(f"{'well-behaved load':<{w}}  {'baseline':>10}  {'abusers':>10}  {'ratio':>6}"
                 f"  {'errors b/a':>11}  req/s b/a")
    for r in rows:
        lines.append(f"{r[0]:<{w}}  {r[1]:>10}  {r[2]:>10}  {r[3]:>6}  {r[4]:>11}  {r[5]}")
    m = out["memory"]
    lines.append(f"server peak RSS: baseline {mib(m['baseline_peak_rss'])}, with abusers "
                 f"{mib(m['abuse_peak_rss'])}; bound {mib(m['bound'])} "
                 f"({'under' if m['under_bound'] else 'OVER'}); peak gauges with abusers: "
                 + ", ".join(f"{k} {v}" for k, v in m["abuse_gauge_peaks"].items()))
    cpu = [(ph["load"].get("http") or {}).get("server_cpu_share") for ph in (base, ab)]
    lines.append("server CPU (all threads, over the measured window): "
                 + " / ".join("n/a" if c is None else f"{c * 100:.0f}% of a core" for c in cpu)
                 + " (baseline / with abusers)")
    if xp:
        lines.append(f"probe answers over 20 ms: baseline {len((bp or {}).get('slow_over_20ms', []))}, "
                     f"with abusers {len(slow)} ({in_emfile} of them during the "
                     f"{len(phases_emfile)} descriptor-exhaustion phases)")
    lines.append(f"crashes: {crashes} (baseline: health {base['health']}, exit {base['exit']};"
                 f" abusers: health {ab['health']}, exit {ab['exit']})")
    lines.append("closed by each limit (baseline / with abusers):")
    cl = [(k, base["closed_by_limit"].get(k), ab["closed_by_limit"].get(k))
          for k in ab["closed_by_limit"]]
    for i in range(0, len(cl), 4):
        lines.append("  " + "   ".join(f"{k} {b}/{x}" for k, b, x in cl[i:i + 4]))
    kinds = abusers.get("kinds", {})
    if kinds:
        lines.append("abusers (outcome x count; seconds until it: median/max; "
                     "attempts during an EMFILE phase apart):")
        for name, k in kinds.items():
            outs = "; ".join(
                f"{o} x{n}" + (f" ({k['seconds'][o]['median']}/{k['seconds'][o]['max']} s)"
                               if o in k["seconds"] else "")
                for o, n in k["outcomes"].items())
            flag = " UNEXPECTED: " + ", ".join(k["unexpected"]) if k["unexpected"] else ""
            emf = f" [during EMFILE: {sum(k['during_emfile'].values())}]" \
                if k["during_emfile"] else ""
            lines.append(f"  {name}: {k['attempts']} attempts: {outs}{emf}{flag}")
        unexpected = sum(sum(k["unexpected"].values()) for k in kinds.values())
        out["abusers_unexpected"] = unexpected
        lines.append(f"abuser outcomes not expected: {unexpected}; the abusers used "
                     f"{abusers.get('cpu_seconds')} CPU-seconds of core 1"
                     + (f"; unfinished: {abusers['unfinished']}" if abusers.get("unfinished")
                        else ""))
    text = "\n".join(lines)
    print(text)
    out["table"] = text
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"report written to {a.json}")
    return 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "ready":
        return ready(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--admin", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("probe")
    s.add_argument("--http", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--interval", type=float, default=0.01)
    s.add_argument("--out", required=True)
    s = sub.add_parser("get")
    s.add_argument("url")
    s.add_argument("--out")
    s.add_argument("--timeout", type=float, default=5)
    s = sub.add_parser("report")
    s.add_argument("--dir", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--minutes", required=True)
    s.add_argument("--commit", default="unknown")
    s.add_argument("--machine", default="")
    s.add_argument("--fd-limit", type=int, required=True)
    s.add_argument("--max-write-buffer", type=int, required=True)
    s.add_argument("--max-read-buffer", type=int, required=True)
    s.add_argument("--overshoot", type=int, required=True)
    a = p.parse_args()
    return {"sample": sample, "probe": probe, "get": get, "report": report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
