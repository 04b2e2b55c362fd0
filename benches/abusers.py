#!/usr/bin/env python3
"""Hostile clients for benches/soak.sh: every attack of issue 11, each kind in its own thread,
each in a loop bounded in time (--seconds) and count, each counting what happened to it.

Standard library only (Linux: TCP_INFO, SO_LINGER). Run by benches/soak.sh beside the
well-behaved load of `shardnet bench`; it can be run alone against a server started with the
limits it is told (--header-timeout, --write-timeout, ...):

    python3 benches/abusers.py --http 127.0.0.1:8080 --echo 127.0.0.1:7000 \
        --seconds 60 --fd-limit 2048 --json bench-out/abusers.json

Every kind records one outcome per attempt (for example "408 then closed" with the seconds
until the answer) and names the outcomes that are correct; anything else is counted as
unexpected. While the descriptor-exhaustion kind holds the server at its limit (EMFILE), new
connections of the other kinds wait in the kernel's backlog: their attempts that overlap such
a phase are counted apart ("during EMFILE") and not judged.
"""

import argparse
import json
import os
import random
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter, defaultdict

TCP_CLOSE = 7  # tcpi_state of a socket that received a reset (or was closed both ways)
REQ = b"GET /plaintext HTTP/1.1\r\nHost: soak\r\n\r\n"
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class Unexpected(Exception):
    """An answer the attack did not expect; its message becomes the outcome."""


def now():
    return time.monotonic()


def addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Conn:
    """One client connection with a read buffer. Every read has a deadline."""

    def __init__(self, address, rcvbuf=None, timeout=10.0):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                # Before connect, so the window the server sees is small from the start.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(timeout)
            s.connect(address)
        except BaseException:
            s.close()
            raise
        self.s = s
        self.buf = bytearray()

    def send(self, data, timeout=10.0):
        self.s.settimeout(timeout)
        self.s.sendall(data)

    def fill(self, deadline):
        left = deadline - now()
        if left <= 0:
            raise TimeoutError
        self.s.settimeout(left)
        d = self.s.recv(1 << 16)
        if not d:
            raise EOFError
        self.buf += d

    def response(self, deadline):
        """(status, head, body) of one HTTP response."""
        while b"\r\n\r\n" not in self.buf:
            self.fill(deadline)
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[:end]
        status = int(head.split(" ", 2)[1])
        length = 0
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        while len(self.buf) < length:
            self.fill(deadline)
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return status, head, body

    def frame(self, deadline, pong=False):
        """(opcode, payload) of one server frame; pings are answered when `pong`."""
        while True:
            f = parse_frame(self.buf)
            if f is None:
                self.fill(deadline)
                continue
            op, payload, used = f
            del self.buf[:used]
            if op == OP_PING and pong:
                self.send(frame(OP_PONG, payload))
                continue
            return op, payload

    def close_code(self, deadline, pong=False):
        """Reads frames up to a close frame: (its code, data frames before it)."""
        frames = 0
        while True:
            op, payload = self.frame(deadline, pong)
            if op == OP_CLOSE:
                return (struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None), frames
            frames += 1

    def to_end(self, deadline):
        """Reads until the stream ends: ("EOF" | "reset" | "timeout", bytes read)."""
        got = len(self.buf)
        self.buf.clear()
        try:
            while True:
                left = deadline - now()
                if left <= 0:
                    return "timeout", got
                self.s.settimeout(left)
                d = self.s.recv(1 << 16)
                if not d:
                    return "EOF", got
                got += len(d)
        except ConnectionResetError:
            return "reset", got
        except (TimeoutError, socket.timeout):
            return "timeout", got

    def state(self):
        return self.s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

    def reset(self):
        """Closes with SO_LINGER 0: the kernel sends RST, not FIN."""
        try:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self.s.close()

    def close(self):
        self.s.close()


def frame(op, payload, fin=True):
    """A client frame: masked, with an all-zero key (valid, and the payload is sent as is)."""
    b0 = (0x80 if fin else 0) | op
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", b0, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def parse_frame(buf):
    """(opcode, payload, bytes used) of the server frame at the start of `buf`, or None."""
    if len(buf) < 2:
        return None
    op, n, off = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, off = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, off = struct.unpack(">Q", buf[2:10])[0], 10
    if len(buf) < off + n:
        return None
    return op, bytes(buf[off:off + n]), off + n


def ws_open(ctx, path, rcvbuf=None):
    c = Conn(ctx.http, rcvbuf)
    c.send(UPGRADE.format(path=path).encode() + b"\r\n")
    status, _, _ = c.response(now() + 10)
    if status != 101:
        c.close()
        raise Unexpected(f"upgrade answered {status}")
    return c


def text(obj):
    return frame(OP_TEXT, json.dumps(obj, separators=(",", ":")).encode())


def readable(socks, timeout):
    """The sockets of `socks` with input (or an error) within `timeout` seconds. poll(2), not
    select(2): descriptors here go past select's 1024."""
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN)
    fds = {fd for fd, _ in p.poll(timeout * 1000)}
    return [s for s in socks if s.fileno() in fds]


def timed(outcome, seconds, lo, hi):
    """The outcome, marked early or late when `seconds` is outside [lo, hi]."""
    if seconds < lo:
        return outcome + " (early)", seconds
    if seconds > hi:
        return outcome + " (late)", seconds
    return outcome, seconds


def flood_until_reset(c, batch, give_up):
    """Writes `batch` without reading until the socket stops taking it, then waits for the
    server's reset; seconds from the first blocked write to the reset, or None."""
    c.s.setblocking(False)
    blocked = None
    while now() < give_up:
        if c.state() == TCP_CLOSE:
            break
        if blocked is None:
            try:
                if c.s.send(batch) < len(batch):
                    blocked = now()
            except BlockingIOError:
                blocked = now()
            except (ConnectionResetError, BrokenPipeError):
                break
        else:
            time.sleep(0.05)
    if c.state() != TCP_CLOSE:
        return None
    return now() - (blocked if blocked is not None else now())


# ---------------------------------------------------------------------------------------------
# The attacks. Each takes (ctx, state) and returns a list of (outcome, seconds or None); state is
# the kind's own dict, kept across attempts. Each attempt is bounded by its own deadlines.


def slowloris(request, n=10):
    def attack(ctx, state):
        conns = [Conn(ctx.http) for _ in range(n)]
        start, sent, out = now(), [0] * n, []
        pending = set(range(n))
        limit = start + ctx.header_timeout * 2 + 5
        try:
            while pending and now() < limit:
                for i in list(pending):
                    if sent[i] < len(request) - 1:
                        try:
                            conns[i].s.send(request[sent[i]:sent[i] + 1])
                            sent[i] += 1
                        except OSError:
                            pending.discard(i)
                            out.append(("reset while still sending", now() - start))
                ready = readable([conns[i].s for i in pending], 0.25)
                for i in [i for i in pending if conns[i].s in ready]:
                    pending.discard(i)
                    at = now() - start
                    try:
                        status, _, _ = conns[i].response(now() + 5)
                        end, _ = conns[i].to_end(now() + 5)
                        out.append(timed(f"{status} then {end}", at, ctx.header_timeout * 0.9,
                                         ctx.header_timeout + 3))
                    except (EOFError, ConnectionResetError):
                        out.append(("closed without an answer", at))
            out += [("never answered", now() - start)] * len(pending)
        finally:
            for c in conns:
                c.close()
        return out

    return attack


def pipeline_below(ctx, state):
    """Pipelines requests and never reads; the count adapts so the answers overflow the kernel's
    buffers by less than max_write_buffer (the server reads them all: no pause)."""
    n = state.setdefault("n", 22000)
    one = state.get("one")
    if one is None:
        c = Conn(ctx.http)
        c.send(REQ)
        _, head, body = c.response(now() + 5)
        c.close()
        one = state["one"] = len(head) + len(body)
    c = Conn(ctx.http, rcvbuf=4096)
    try:
        c.send(REQ * n, timeout=5)
        start = now()
        wait = start + ctx.write_timeout + 1.5
        while now() < wait and c.state() != TCP_CLOSE:
            time.sleep(0.1)
        how, got = c.to_end(now() + 3)
        full = n * one
        if how == "reset":
            state["n"] = max(1000, n - 250)
            return [("reset: reading had paused at the bound (over it), write_timeout", now() - start)]
        if how == "EOF" and got < full:
            return [("closed by write_timeout with output queued under the bound", ctx.write_timeout)]
        if how == "timeout" and got >= full:
            state["n"] = n + 250
            how, _ = c.to_end(start + ctx.idle_timeout + 3)
            return [timed(f"kernel buffers took all; idle_timeout then {how}", now() - start,
                          ctx.idle_timeout * 0.9, ctx.idle_timeout + 3)]
        return [(f"{how} after {got} of {full} bytes", now() - start)]
    finally:
        c.close()


def pipeline_above(ctx, state):
    """Pipelines requests and never reads, until the server stops taking them."""
    c = Conn(ctx.http, rcvbuf=4096)
    try:
        waited = flood_until_reset(c, REQ * 1000, now() + 15 + ctx.write_timeout)
        if waited is None:
            return [("never closed", None)]
        return [timed("reset after write_timeout (reading paused at the bound)", waited,
                      ctx.write_timeout * 0.5, ctx.write_timeout + 3)]
    finally:
        c.close()


def fin_with_data(ctx, state):
    """A request and the FIN in one go: the answer, then the end of the stream, at once."""
    out = []
    for kind in ("http", "echo"):
        c = Conn(ctx.http if kind == "http" else ctx.echo)
        try:
            start = now()
            payload = REQ if kind == "http" else b"hello, then FIN\n"
            c.send(payload)
            c.s.shutdown(socket.SHUT_WR)
            if kind == "http":
                status, _, _ = c.response(start + 5)
                end, _ = c.to_end(start + 5)
                what = f"http {status} then {end}"
            else:
                end, got = c.to_end(start + 5)
                what = f"echo {'whole' if got == len(payload) else got} then {end}"
            out.append(timed(what, now() - start, 0, 1.5))
        finally:
            c.close()
    return out


def header_streamer(ctx, state):
    """Every write completes one request and starts the next (each read ends inside a request),
    one request per 0.25 s, for three header timeouts: every one must get 200."""
    c = Conn(ctx.http)
    head, tail = REQ[:12], REQ[12:]
    try:
        c.send(head)
        start, ok = now(), 0
        for i in range(int(ctx.header_timeout * 3 / 0.25)):
            time.sleep(max(0, start + 0.25 * (i + 1) - now()))
            c.send(tail + head)
            status, _, _ = c.response(now() + 5)
            if status != 200:
                return [(f"{status} after {ok} x 200", now() - start)]
            ok += 1
        c.send(tail)
        status, _, _ = c.response(now() + 5)
        return [("every request 200" if status == 200 else f"last {status}", now() - start)]
    finally:
        c.close()


def idle_silent(ctx, state):
    """Connections that never send: closed after idle_timeout."""
    conns = [Conn(ctx.echo) for _ in range(5)]
    start, out = now(), []
    try:
        for c in conns:
            end, _ = c.to_end(start + ctx.idle_timeout + 5)
            out.append(timed(f"idle_timeout then {end}", now() - start, ctx.idle_timeout * 0.9,
                             ctx.idle_timeout + 3))
    finally:
        for c in conns:
            c.close()
    return out


def ws_silent(ctx, state):
    """An upgraded connection that never answers pings: pinged, then closed with 1001."""
    c = ws_open(ctx, "/ws/echo")
    start = now()
    try:
        pinged = None
        limit = start + ctx.ping_interval + ctx.pong_timeout + 5
        while True:
            op, payload = c.frame(limit)
            if op == OP_PING and pinged is None:
                pinged = now() - start
            elif op == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0]
                what = f"{'pinged, ' if pinged else ''}close {code}"
                return [timed(what, now() - start, ctx.ping_interval + ctx.pong_timeout * 0.9,
                              ctx.ping_interval + ctx.pong_timeout + 3)]
    finally:
        c.close()


def pubsub_nonreaders(path):
    """Subscribers that never read, under a publish flood: each must be closed (write_timeout;
    or the 1008 of slow_consumer = "disconnect"), its queue never above the bound."""

    def attack(ctx, state):
        topic = f"flood-{path.strip('/').replace('/', '-')}-{os.getpid()}"
        subs = []
        pub = None
        try:
            for _ in range(5):
                s = ws_open(ctx, path, rcvbuf=4096)
                subs.append(s)
                s.send(text({"op": "subscribe", "topic": topic}))
                op, body = s.frame(now() + 5)
                if b'"ok":"subscribe"' not in body:
                    raise Unexpected(f"subscribe answered {body[:80]!r}")
            pub = ws_open(ctx, path)
            msg = text({"op": "publish", "topic": topic, "data": "x" * 4000})
            batch = msg * 50
            start = now()
            # 2,000 messages/s of 4 KB for write_timeout + 3 s.
            while now() < start + ctx.write_timeout + 3:
                pub.send(batch)
                time.sleep(0.025)
            out = []
            for s in subs:
                data = bytearray()
                how = "timeout"
                deadline = now() + 5
                try:
                    while True:
                        s.fill(deadline)
                        data += s.buf
                        s.buf.clear()
                except EOFError:
                    how = "EOF"
                except ConnectionResetError:
                    how = "reset"
                except (TimeoutError, socket.timeout):
                    pass
                code = None
                while True:
                    f = parse_frame(data)
                    if f is None:
                        break
                    if f[0] == OP_CLOSE:
                        code = struct.unpack(">H", f[1][:2])[0]
                        break
                    del data[:f[2]]
                what = "closed" if how != "timeout" else "still open"
                out.append((f"{what}{f' after close {code}' if code else ''}", None))
            return out
        finally:
            for s in subs:
                s.close()
            if pub:
                pub.close()

    return attack


def topics_12000(ctx, state):
    """Publishes to 12,000 distinct topics, each with a (reading) subscriber: one round is one
    publish per topic in one write; every message must arrive, in bounded time. The
    subscribers stay between rounds (answering pings); a failed round starts them afresh."""
    topics = 12000
    try:
        if "subs" not in state:
            state["subs"] = subs = []
            for j in range(0, topics, ctx.max_topics):
                s = ws_open(ctx, "/ws")
                subs.append(s)
                mine = range(j, min(j + ctx.max_topics, topics))
                s.send(b"".join(text({"op": "subscribe", "topic": f"t12k-{i}"}) for i in mine))
                for _ in mine:
                    op, body = s.frame(now() + 10, pong=True)
                    if b'"ok":"subscribe"' not in body:
                        raise Unexpected(f"subscribe answered {body[:80]!r}")
            state["pub"] = ws_open(ctx, "/ws")
            state["round"] = b"".join(text({"op": "publish", "topic": f"t12k-{i}", "data": i})
                                      for i in range(topics))
        subs, pub = state["subs"], state["pub"]
        start = now()
        pub.send(state["round"])
        got, deadline = 0, start + 15
        by_fd = {s.s.fileno(): s for s in subs + [pub]}
        while got < topics and now() < deadline:
            for sock in readable([s.s for s in subs + [pub]], 0.5):
                s = by_fd[sock.fileno()]
                s.fill(now() + 1)
                while True:
                    f = parse_frame(s.buf)
                    if f is None:
                        break
                    del s.buf[:f[2]]
                    if f[0] == OP_PING:
                        s.send(frame(OP_PONG, f[1]))
                    elif f[0] == OP_TEXT and s is not pub:
                        got += 1
                    elif f[0] == OP_CLOSE:
                        raise Unexpected("a subscriber was closed")
        if got < topics:
            topics_12000_cleanup(state)
            return [(f"not all delivered within 15 s", now() - start)]
        return [timed("all 12,000 delivered", now() - start, 0, 5)]
    except BaseException:
        topics_12000_cleanup(state)
        raise


def topics_12000_cleanup(state):
    for s in state.pop("subs", []):
        s.close()
    if state.get("pub"):
        state.pop("pub").close()


def subscribe_over_limit(ctx, state):
    """max_topics + 1 subscriptions: the last is refused, naming the limit."""
    c = ws_open(ctx, "/ws")
    try:
        n = ctx.max_topics + 1
        c.send(b"".join(text({"op": "subscribe", "topic": f"over-{os.getpid()}-{i}"})
                        for i in range(n)))
        oks = errors = 0
        last = b""
        for _ in range(n):
            _, last = c.frame(now() + 5, pong=True)
            if b'"ok":"subscribe"' in last:
                oks += 1
            else:
                errors += 1
        if oks == ctx.max_topics and errors == 1 and b"max_topics" in last:
            return [("limit acks, the next refused naming max_topics", None)]
        return [(f"{oks} acks, {errors} refusals", None)]
    finally:
        c.close()


def oversize_publish(ctx, state):
    """Publishes over max_message, measured as the subscriber would receive them."""
    out = []

    def post(body):
        c = Conn(ctx.http)
        try:
            c.send(f"POST /publish/big HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(body)}"
                   f"\r\n\r\n".encode() + body)
            status, _, answer = c.response(now() + 5)
            return status, answer
        finally:
            c.close()

    # A JSON string of max_message bytes: the frame with its envelope is larger.
    status, answer = post(b'"' + b"x" * ctx.max_message + b'"')
    out.append((f"{status}{' naming max_message' if b'max_message' in answer else ''}", None))
    # Control bytes: valid text, six times larger once escaped.
    status, answer = post(b"\x01" * (ctx.max_message // 3))
    out.append((f"{status}{' naming max_message' if b'max_message' in answer else ''}", None))
    status, _ = post(b"\xff\xfe\x00")
    out.append((f"{status} (not text)", None))
    # A WebSocket message over max_message: 1009 from the frame header.
    c = ws_open(ctx, "/ws")
    try:
        c.send(frame(OP_TEXT, b"{" + b" " * ctx.max_message + b"}"))
        code, _ = c.close_code(now() + 5)
        out.append((f"ws close {code}", None))
    except (BrokenPipeError, ConnectionResetError):
        out.append(("ws reset while sending", None))
    finally:
        c.close()
    # A WebSocket publish that grows when re-encoded (9e9 is 9000000000.0): an error message,
    # and the connection stays usable.
    c = ws_open(ctx, "/ws")
    try:
        data = "[" + "9e9," * (ctx.max_message // 12) + "9e9]"
        c.send(frame(OP_TEXT, f'{{"op":"publish","topic":"big","data":{data}}}'.encode()))
        _, err = c.frame(now() + 5, pong=True)
        c.send(text({"op": "subscribe", "topic": "after-refusal"}))
        _, ack = c.frame(now() + 5, pong=True)
        kept = b'"ok":"subscribe"' in ack
        out.append((f"ws {'error naming max_message' if b'max_message' in err else err[:40]}"
                    f"{', connection kept' if kept else ', connection lost'}", None))
    finally:
        c.close()
    return out


SMUGGLING = [
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n1", 400),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\n1", 400),
    (b"GET /plaintext HTTP/1.1\r\n\r\n", 400),
    (b"GET /plaintext HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET /plaintext HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /plaintext HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\nhello", 400),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n0\r\n\r\n", 400),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4"
     b"\r\n\r\n0\r\n\r\n", 400),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
     400),
    (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n", 400),
    (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
     b"0\r\n\r\n", 411),
    (b"GET /plaintext HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
]


def smuggling(ctx, state):
    """Framing and smuggling inputs: each gets its status, Connection: close and a FIN."""
    out = []
    for i, (request, expected) in enumerate(SMUGGLING):
        c = Conn(ctx.http)
        try:
            c.send(request)
            status, head, _ = c.response(now() + 5)
            end, _ = c.to_end(now() + 5)
            closing = "connection: close" in head.lower()
            if status == expected and closing and end == "EOF":
                out.append(("its status, then closed", None))
            else:
                out.append((f"case {i}: {status} (want {expected}), then {end}", None))
        except (ConnectionResetError, BrokenPipeError):
            out.append((f"case {i}: reset", None))
        finally:
            c.close()
    return out


def huge_frames(ctx, state):
    """Frame headers announcing more than can be buffered: refused from the header."""
    out = []
    for length, want in ((1 << 63, 1002), (1 << 62, 1009), (ctx.max_read_buffer, 1009)):
        c = ws_open(ctx, "/ws/echo")
        try:
            start = now()
            c.send(struct.pack(">BBQ", 0x82, 0xFF, length) + b"\1\2\3\4")
            code, _ = c.close_code(now() + 5)
            end, _ = c.to_end(now() + 5)
            ok = code == want and end == "EOF"
            out.append(timed("its close code from the header" if ok else f"{code}/{end} for "
                             f"2^{length.bit_length() - 1}", now() - start, 0, 2))
        finally:
            c.close()
    return out


def invalid_utf8(ctx, state):
    """Bad UTF-8 in a text frame that has not fully arrived, and across fragments: 1007 at once."""
    out = []
    payload = bytearray(b"a" * 10000)
    payload[2:4] = b"\xc3\x28"
    whole = frame(OP_TEXT, bytes(payload))
    cases = (
        ("in an incomplete frame", whole[:8 + 100]),
        ("across fragments", frame(OP_TEXT, b"ab\xc3", fin=False) + frame(OP_CONT, b"\x28", True)),
    )
    for what, data in cases:
        c = ws_open(ctx, "/ws/echo")
        try:
            start = now()
            c.send(data)
            code, _ = c.close_code(now() + 5)
            out.append(timed(f"close {code} {what}", now() - start, 0, 2))
        finally:
            c.close()
    return out


def fragment_flood(ctx, state):
    """One-byte fragments: under max_message the message is echoed whole; over it, 1009."""
    if "small" not in state:
        one = frame(OP_CONT, b"a", fin=False)
        for name, n in (("small", ctx.max_message * 3 // 4), ("large", 200_000)):
            state[name] = (frame(OP_TEXT, b"a", fin=False) + one * (n - 2)
                           + frame(OP_CONT, b"a", fin=True), n)
    which = state["turn"] = "large" if state.get("turn") == "small" else "small"
    data, n = state[which]
    c = ws_open(ctx, "/ws/echo")
    errors = []

    def write():
        try:
            c.send(data, timeout=20)
        except OSError as e:
            errors.append(e)

    writer = threading.Thread(target=write, daemon=True)
    start = now()
    writer.start()
    try:
        op, payload = c.frame(now() + 30, pong=True)
        if op == OP_TEXT:
            what = f"{n:,} fragments echoed whole" if len(payload) == n else f"echo of {len(payload)}"
        elif op == OP_CLOSE:
            code = struct.unpack(">H", payload[:2])[0]
            what = f"{n:,} fragments: close {code}"
        else:
            what = f"opcode {op}"
        return [timed(what, now() - start, 0, 20)]
    finally:
        writer.join(25)
        c.close()


def ping_flood(ctx, state):
    """Pings from a client that never reads the pongs: bounded, then closed."""
    c = ws_open(ctx, "/ws/echo", rcvbuf=4096)
    try:
        waited = flood_until_reset(c, frame(OP_PING, b"p" * 125) * 500,
                                   now() + 15 + ctx.write_timeout)
        if waited is None:
            return [("never closed", None)]
        return [timed("reset after write_timeout", waited, ctx.write_timeout * 0.5,
                      ctx.write_timeout + 3)]
    finally:
        c.close()


def reset_mid_response(ctx, state):
    """Pipelines 2,000 requests, reads a little, resets; a new connection is then served."""
    c = Conn(ctx.http)
    c.send(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
    c.fill(now() + 5)
    c.reset()
    probe = Conn(ctx.http)
    try:
        probe.send(REQ)
        status, _, _ = probe.response(now() + 5)
        return [(f"reset; next connection {status}", None)]
    finally:
        probe.close()


def descriptor_exhaustion(ctx, state):
    """Opens connections past the server's descriptor limit (it must pause accepting, not
    fail), holds them 2 s, closes them, and times the recovery: a new connection served."""
    out = []
    with ctx.lock:
        ctx.emfile_epoch += 1  # odd: a phase is on
    began = time.time()
    held = []
    try:
        for _ in range(ctx.fd_limit + 200):
            try:
                s = socket.create_connection(ctx.echo, timeout=2)
            except OSError:
                break
            s.setblocking(False)
            held.append(s)
        for s in held:
            try:
                s.send(b"x")
            except OSError:
                pass
        served, deadline = set(), now() + 3
        while now() < deadline and len(served) < len(held):
            served.update(readable([s for s in held if s not in served], 0.2))
        time.sleep(max(0, deadline - now()))
    finally:
        for s in held:
            s.close()
        with ctx.lock:
            ctx.emfile_epoch += 1
    released = now()
    while now() < released + 30:
        try:
            c = Conn(ctx.echo, timeout=2)
            try:
                c.send(b"back?\n")
                c.fill(now() + 1)
                if bytes(c.buf) == b"back?\n":
                    break
            finally:
                c.close()
        except (OSError, EOFError):
            pass
    recovered = now() - released
    waiting = len(held) - len(served)
    what = "limit reached, recovered" if waiting > 0 else "limit not reached"
    out.append(timed(what, recovered, 0, 5))
    # Wall-clock times, to line up with the probe's slow answers.
    state.setdefault("detail", []).append(
        {"held": len(held), "served": len(served), "recovered_seconds": round(recovered, 3),
         "began": round(began, 3), "released": round(time.time() - (now() - released), 3)})
    return out


class Kind:
    def __init__(self, name, fn, expected, pause, cleanup=None, holds_limit=False):
        self.name, self.fn, self.expected, self.pause, self.cleanup = (
            name, fn, set(expected), pause, cleanup)
        # The kind that makes the EMFILE phases: its own attempts are judged.
        self.holds_limit = holds_limit
        self.outcomes = Counter()
        self.overlapped = Counter()
        self.seconds = defaultdict(list)
        self.state = {}
        self.attempts = 0


def kinds(ctx):
    slow_get = REQ[:-2] + b"X-Slow: " + b"s" * 120 + b"\r\n\r\n"
    slow_ws = UPGRADE.format(path="/ws").encode() + b"X-Slow: " + b"s" * 120 + b"\r\n\r\n"
    return [
        Kind("slowloris_headers", slowloris(slow_get), ["408 then EOF"], 1),
        Kind("slowloris_ws_upgrade", slowloris(slow_ws), ["408 then EOF"], 1),
        Kind("pipeline_nonreader_below", pipeline_below, [
            "closed by write_timeout with output queued under the bound",
            "reset: reading had paused at the bound (over it), write_timeout",
            "kernel buffers took all; idle_timeout then EOF"], 0.5),
        Kind("pipeline_nonreader_above", pipeline_above,
             ["reset after write_timeout (reading paused at the bound)"], 0.5),
        Kind("fin_with_data", fin_with_data, ["http 200 then EOF", "echo whole then EOF"], 0.2),
        Kind("header_timer_streamer", header_streamer, ["every request 200"], 0.5),
        Kind("idle_silent", idle_silent, ["idle_timeout then EOF"], 1),
        Kind("ws_no_pong", ws_silent, ["pinged, close 1001"], 1),
        Kind("pubsub_nonreaders_drop", pubsub_nonreaders("/ws"), ["closed"], 1),
        Kind("pubsub_nonreaders_disconnect", pubsub_nonreaders("/ws/strict"),
             ["closed", "closed after close 1008"], 1),
        Kind("topics_12000", topics_12000, ["all 12,000 delivered"], 1, topics_12000_cleanup),
        Kind("subscribe_over_limit", subscribe_over_limit,
             ["limit acks, the next refused naming max_topics"], 1),
        Kind("oversize_publish", oversize_publish, [
            "413 naming max_message", "415 (not text)", "ws close 1009",
            "ws error naming max_message, connection kept"], 1),
        Kind("http_smuggling_framing", smuggling, ["its status, then closed"], 1),
        Kind("ws_huge_announced_frame", huge_frames, ["its close code from the header"], 1),
        Kind("ws_invalid_utf8_midframe", invalid_utf8,
             ["close 1007 in an incomplete frame", "close 1007 across fragments"], 1),
        Kind("ws_fragment_flood", fragment_flood, [
            f"{ctx.max_message * 3 // 4:,} fragments echoed whole", "200,000 fragments: close 1009"],
            1),
        Kind("ws_ping_flood_nonreader", ping_flood, ["reset after write_timeout"], 0.5),
        Kind("rst_mid_response", reset_mid_response, ["reset; next connection 200"], 0.2),
        Kind("descriptor_exhaustion", descriptor_exhaustion, ["limit reached, recovered"], 20,
             holds_limit=True),
    ]


def describe(e):
    if isinstance(e, Unexpected):
        return str(e)
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, EOFError):
        return "closed before the answer"
    if isinstance(e, ConnectionResetError):
        return "reset before the answer"
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {os.strerror(e.errno) if e.errno else e}"
    return f"{type(e).__name__}: {e}"


def run(kind, ctx):
    # The first attempts of each kind start spread over a second, not all at once.
    time.sleep(random.random())
    while now() < ctx.end and kind.attempts < 100_000:
        epoch = ctx.emfile_epoch
        try:
            results = kind.fn(ctx, kind.state)
        except Exception as e:  # every failure is an outcome, counted
            results = [(describe(e), None)]
        overlapped = not kind.holds_limit and (epoch % 2 == 1 or ctx.emfile_epoch != epoch)
        with ctx.lock:
            kind.attempts += 1
            for outcome, seconds in results:
                (kind.overlapped if overlapped else kind.outcomes)[outcome] += 1
                if seconds is not None and not overlapped:
                    kind.seconds[outcome].append(seconds)
        time.sleep(max(0, min(kind.pause, ctx.end - now())))
    if kind.cleanup:
        kind.cleanup(kind.state)


def summary(kind):
    seconds = {}
    for outcome, xs in kind.seconds.items():
        xs = sorted(xs)
        seconds[outcome] = {"min": round(xs[0], 3), "median": round(xs[len(xs) // 2], 3),
                            "max": round(xs[-1], 3)}
    unexpected = {o: n for o, n in kind.outcomes.items() if o not in kind.expected}
    return {
        "attempts": kind.attempts,
        "outcomes": dict(kind.outcomes),
        "expected": sorted(kind.expected),
        "unexpected": unexpected,
        "during_emfile": dict(kind.overlapped),
        "seconds": seconds,
        **({"detail": kind.state["detail"]} if "detail" in kind.state else {}),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", type=addr, required=True)
    p.add_argument("--echo", type=addr, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--fd-limit", type=int, required=True, help="the server's RLIMIT_NOFILE")
    p.add_argument("--header-timeout", type=float, default=2)
    p.add_argument("--write-timeout", type=float, default=3)
    p.add_argument("--idle-timeout", type=float, default=10)
    p.add_argument("--ping-interval", type=float, default=5)
    p.add_argument("--pong-timeout", type=float, default=3)
    p.add_argument("--max-message", type=int, default=64 * 1024)
    p.add_argument("--max-read-buffer", type=int, default=256 * 1024)
    p.add_argument("--max-topics", type=int, default=64)
    p.add_argument("--only", help="comma list of kinds to run (default: all)")
    ctx = p.parse_args()
    ctx.lock = threading.Lock()
    ctx.emfile_epoch = 0
    ctx.end = now() + ctx.seconds
    chosen = kinds(ctx)
    if ctx.only:
        names = set(ctx.only.split(","))
        chosen = [k for k in chosen if k.name in names]
    threads = [threading.Thread(target=run, args=(k, ctx), name=k.name, daemon=True)
               for k in chosen]
    for t in threads:
        t.start()
    # An attempt started just before the end finishes within its own bounds (at most about
    # idle_timeout + 5 s, or 30 s for a fragment flood); one still running then is left out.
    grace = now() + max(30, ctx.idle_timeout + 10)
    for t in threads:
        t.join(max(0, grace - now()) + max(0, ctx.end - now()))
    report = {k.name: summary(k) for k in chosen}
    late = [t.name for t in threads if t.is_alive()]
    with open(ctx.json, "w") as f:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        json.dump({"seconds": ctx.seconds, "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
                   "kinds": report, "unfinished": late}, f, indent=1)
    bad = sum(sum(k["unexpected"].values()) for k in report.values())
    print(f"abusers: {sum(k['attempts'] for k in report.values())} attempts, {bad} unexpected"
          f" outcomes{', unfinished: ' + ','.join(late) if late else ''}")


if __name__ == "__main__":
    sys.exit(main())
