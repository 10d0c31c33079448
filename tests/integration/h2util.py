"""HTTP/2 helpers for the integration tests: a raw frame client over TLS (ALPN h2) that can
send what python3-h2 refuses to (uppercase names, bad pseudo-headers, floods), and memory
sampling of the proxy under test.

Frames are built by hand (RFC 9113 §4.1) and header blocks encoded with hpack.Encoder, which
does not validate names, so malformed requests go out exactly as written.
"""

import socket
import ssl
import struct
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, \
    STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, \
    CONNECT_ERROR, ENHANCE_YOUR_CALM = range(12)

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, \
    S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
S_ENABLE_CONNECT_PROTOCOL = 8


class Frame:
    def __init__(self, type, flags, sid, payload):
        self.type, self.flags, self.sid, self.payload = type, flags, sid, payload

    @property
    def error_code(self):
        if self.type == RST_STREAM:
            return struct.unpack(">I", self.payload[:4])[0]
        if self.type == GOAWAY:
            return struct.unpack(">I", self.payload[4:8])[0]
        return None

    def __repr__(self):
        return f"Frame(type={self.type}, flags={self.flags:#x}, sid={self.sid}, " \
               f"len={len(self.payload)}, err={self.error_code})"


def frame(type, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([type, flags]) + \
        struct.pack(">I", sid & 0x7fffffff) + payload


def settings_payload(**kv):
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3,
           "initial_window_size": 4, "max_frame_size": 5, "max_header_list_size": 6}
    return b"".join(struct.pack(">HI", ids[k], v) for k, v in kv.items())


class RawH2:
    """One TLS connection speaking raw HTTP/2 frames."""

    def __init__(self, port, cafile, settings=None, preface=True, timeout=10.0):
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.port = port
        self.buf = b""
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.dec.max_allowed_table_size = 65536
        self.frames = []  # every frame read so far
        self.cursor = 0   # how far read_until has looked in self.frames
        self.server_settings = {}
        self.closed = False
        if preface:
            self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings or b""))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def send_frame(self, type, flags, sid, payload=b""):
        self.send(frame(type, flags, sid, payload))

    def encode(self, headers, huffman=True):
        return self.enc.encode(headers, huffman=huffman)

    def request(self, sid, headers, end_stream=True, extra_flags=0):
        block = self.encode(headers)
        flags = END_HEADERS | (END_STREAM if end_stream else 0) | extra_flags
        self.send_frame(HEADERS, flags, sid, block)

    def get(self, sid, path="/echo", authority=None, extra=(), end_stream=True, method="GET"):
        h = [(":method", method), (":scheme", "https"),
             (":authority", authority or f"localhost:{self.port}"), (":path", path)]
        self.request(sid, h + list(extra), end_stream=end_stream)

    def _read_some(self, deadline):
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return False
        except (ConnectionResetError, ssl.SSLError, OSError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _parse(self):
        out = []
        while len(self.buf) >= 9:
            ln = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + ln:
                break
            t, fl = self.buf[3], self.buf[4]
            sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7fffffff
            f = Frame(t, fl, sid, self.buf[9:9 + ln])
            self.buf = self.buf[9 + ln:]
            if t == SETTINGS and not fl & ACK:
                for i in range(0, len(f.payload), 6):
                    k, v = struct.unpack(">HI", f.payload[i:i + 6])
                    self.server_settings[k] = v
            if t in (HEADERS, PUSH_PROMISE, CONTINUATION):
                try:
                    f.headers = self.dec.decode(f.payload_block())
                except Exception:
                    f.headers = None
            out.append(f)
        self.frames += out
        return out

    def read_until(self, pred, timeout=5.0):
        """The next frame (after those an earlier read_until looked at) for which pred holds,
        reading more as needed; None at timeout or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            self._parse()
            while self.cursor < len(self.frames):
                f = self.frames[self.cursor]
                self.cursor += 1
                if pred(f):
                    return f
            if time.monotonic() >= deadline or self.closed:
                return None
            self._read_some(deadline)

    def read_for(self, seconds):
        """Read everything that arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closed:
            self._read_some(deadline)
        return self._parse()

    def handshake(self):
        """Wait for the server's SETTINGS and ACK it."""
        f = self.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK)
        assert f is not None, "no SETTINGS from the server"
        self.send_frame(SETTINGS, ACK, 0)
        return f

    def response(self, sid, timeout=10.0):
        """(status, headers dict, body bytes, end_stream seen, rst code or None) of a stream."""
        status, headers, body, ended, rst = None, {}, b"", False, None
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for f in self.frames[seen:]:
                seen += 1
                if f.sid != sid:
                    continue
                if f.type == HEADERS and f.headers:
                    for k, v in f.headers:
                        if k == ":status":
                            status = int(v)
                        else:
                            headers[k] = v
                elif f.type == DATA:
                    body += f.payload_data()
                    if f.payload and not f.flags & END_STREAM:
                        # keep the windows open (the server may close right after the end)
                        try:
                            self.send_frame(WINDOW_UPDATE, 0, 0,
                                            struct.pack(">I", len(f.payload)))
                            self.send_frame(WINDOW_UPDATE, 0, sid,
                                            struct.pack(">I", len(f.payload)))
                        except OSError:
                            pass
                elif f.type == RST_STREAM:
                    rst = f.error_code
                if f.flags & END_STREAM and f.type in (HEADERS, DATA):
                    ended = True
            if ended or rst is not None or self.closed:
                break
            self._read_some(min(deadline, time.monotonic() + 0.2))
            self._parse()
        return status, headers, body, ended, rst

    def goaway(self, timeout=5.0):
        return self.read_until(lambda f: f.type == GOAWAY, timeout)

    def rst(self, sid, timeout=5.0):
        return self.read_until(lambda f: f.type == RST_STREAM and f.sid == sid, timeout)


def _payload_block(self):
    p = self.payload
    off = 0
    if self.flags & PADDED:
        pad = p[0]
        p = p[1:len(p) - pad]
    if self.type == HEADERS and self.flags & PRIO:
        off = 5
    return p[off:]


def _payload_data(self):
    p = self.payload
    if self.flags & PADDED:
        pad = p[0]
        p = p[1:len(p) - pad]
    return p


Frame.payload_block = _payload_block
Frame.payload_data = _payload_data


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class MemWatch:
    """Sample a process's VmRSS every 20 ms on a thread while an attack runs; .peak and
    .base are KiB."""

    def __init__(self, pid):
        import threading
        self.pid = pid
        self.base = rss_kib(pid)
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return
            time.sleep(0.02)

    def stop(self):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_kib(self.pid))
        return (self.peak - self.base) / 1024.0
