#!/usr/bin/python3
"""Bench upstream for the paths a static server cannot serve.

    GET  /sse?n=N&ms=M  text/event-stream, N events M ms apart; each event carries
                        time.monotonic_ns() taken just before its send() (CLOCK_MONOTONIC is
                        system-wide, so the client can subtract it from its own clock).
    PUT|POST /upload    reads the whole body (Content-Length or chunked), then answers
                        "received N" - answering only at the end keeps the proxy streaming the
                        body until the last byte, so the client's upload time is the real one.
    anything else       a small 200.

One thread per connection, blocking sockets, TCP_NODELAY: the simplest server that adds no
buffering of its own to the SSE measurement.  Usage: upstream.py PORT
"""
import socket
import socketserver
import sys
import time
import urllib.parse

RECV = 1 << 20


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.scratch = bytearray(RECV)
        self.view = memoryview(self.scratch)

    def fill(self):
        n = self.sock.recv_into(self.view)
        if n == 0:
            raise EOFError
        self.buf += self.view[:n]

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            self.fill()

    def discard(self, n):
        """Drops n body bytes, reading straight into a reused buffer (no per-read allocation)."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        while n > 0:
            got = self.sock.recv_into(self.view, min(n, RECV))
            if got == 0:
                raise EOFError
            n -= got


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(self.request)
        try:
            while self.one(conn):
                pass
        except (EOFError, ConnectionError, OSError):
            pass

    def one(self, conn):
        start = conn.line()
        while start == b"":
            start = conn.line()
        method, target, _ = start.split(b" ", 2)
        headers = {}
        while True:
            ln = conn.line()
            if not ln:
                break
            k, _, v = ln.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        received = 0
        if b"content-length" in headers:
            received = int(headers[b"content-length"])
            conn.discard(received)
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            while True:
                size = int(conn.line().split(b";")[0], 16)
                if size == 0:
                    while conn.line():
                        pass
                    break
                conn.discard(size + 2)
                received += size
        url = urllib.parse.urlsplit(target.decode())
        close = headers.get(b"connection", b"").lower() == b"close"
        if url.path == "/sse":
            q = dict(urllib.parse.parse_qsl(url.query))
            self.sse(int(q.get("n", "100")), float(q.get("ms", "10")))
            return False
        body = b"received %d\n" % received if url.path == "/upload" else b"hello from bench\n"
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"Connection: close\r\n" if close else b"", body)
        )
        return not close

    def sse(self, n, ms):
        s = self.request
        s.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"6\r\n: hi\n\n\r\n"
        )
        for _ in range(n):
            time.sleep(ms / 1000.0)
            ev = b"data: %d\n\n" % time.monotonic_ns()
            s.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
        s.sendall(b"0\r\n\r\n")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
