#!/usr/bin/python3
"""Measures SSE relay delay through a TLS proxy: upstream.py stamps each event with
CLOCK_MONOTONIC just before writing it; this client stamps each read just after it returns and
subtracts.  The client's own TLS decrypt and Python overhead (tens of microseconds) is included,
identically for every proxy.  Prints one JSON line: p50/p99/max in microseconds.

Usage: sse_client.py PORT [N] [MS]
"""
import json
import re
import socket
import ssl
import sys
import time

EVENT = re.compile(rb"data: (\d+)\n\n")


def main():
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    ms = float(sys.argv[3]) if len(sys.argv) > 3 else 10
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(
        b"GET /sse?n=%d&ms=%g HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
        b"Connection: close\r\n\r\n" % (n, ms)
    )
    acc = b""
    delays = []
    while len(delays) < n:
        data = s.recv(65536)
        now = time.monotonic_ns()
        if not data:
            break
        acc += data
        end = 0
        for m in EVENT.finditer(acc):
            delays.append(now - int(m.group(1)))
            end = m.end()
        acc = acc[end:]
    s.close()
    # The first events also pay for warming caches on every hop; the steady state is the point.
    steady = sorted(delays[5:]) or sorted(delays)
    if not steady:
        print(json.dumps({"error": "no events", "events": 0}))
        return 1

    def pct(p):
        return steady[min(len(steady) - 1, int(len(steady) * p))] / 1000.0

    print(
        json.dumps(
            {"events": len(delays), "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": steady[-1] / 1000.0}
        )
    )
    return 0 if len(delays) == n else 1


if __name__ == "__main__":
    sys.exit(main())
