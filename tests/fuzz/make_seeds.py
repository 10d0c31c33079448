#!/usr/bin/env python3
"""Writes the committed seed corpora in tests/fuzz/seeds/<target>/.

Seeds are small, meaningful inputs in each fuzz target's own input format (see the comment at
the top of tests/fuzz/<target>_fuzz.c). Run it again after changing a format:

    tests/fuzz/make_seeds.py           # everything but the PEM material
    tests/fuzz/make_seeds.py --pem     # also new certificates and keys (needs openssl)

The PEM certificates and keys are made with openssl the first time (or with --pem) and kept in
tests/fuzz/pem/; the ACME seeds reuse them for their certificate downloads. Throwaway test material:
nothing here is trusted anywhere.
"""
import base64
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fresh(target):
    shutil.rmtree(os.path.join(SEEDS, target), ignore_errors=True)


# --- PEM --------------------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pem():
    """A P-256 root "Fuzz Root" and a leaf it signed, a second root "Other Root" with its own
    leaf, and a self-signed RSA-2048 certificate; 100 years so expiry never gets in the way."""
    t = tempfile.mkdtemp()
    try:
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "36500"]
        for root in ("Fuzz Root", "Other Root"):
            tag = root.split()[0].lower()
            openssl("req", "-x509", *ec, "-subj", f"/CN={root}", "-keyout", f"{tag}-root.key",
                    "-out", f"{tag}-root.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign", cwd=t)
            openssl("req", "-new", *ec[:-2], "-subj", "/CN=a.example.com", "-keyout",
                    f"{tag}-leaf.key", "-out", f"{tag}-leaf.csr", cwd=t)
            with open(os.path.join(t, "ext"), "w") as f:
                f.write("subjectAltName=DNS:a.example.com,DNS:b.example.com,IP:::1\n"
                        "authorityKeyIdentifier=keyid\nextendedKeyUsage=serverAuth\n")
            openssl("x509", "-req", "-in", f"{tag}-leaf.csr", "-CA", f"{tag}-root.pem", "-CAkey",
                    f"{tag}-root.key", "-set_serial", "0x00ab12", "-days", "36500", "-extfile",
                    "ext", "-out", f"{tag}-leaf.pem", cwd=t)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "36500", "-subj",
                "/CN=rsa.example.com", "-keyout", "rsa.key", "-out", "rsa.pem", cwd=t)
        openssl("pkey", "-in", "rsa.key", "-traditional", "-out", "rsa-trad.key", cwd=t)
        openssl("ec", "-in", "fuzz-leaf.key", "-out", "fuzz-leaf-sec1.key", cwd=t)
        out = {}
        for n in os.listdir(t):
            if n.endswith((".pem", ".key")) and not n.endswith("-root.key"):
                with open(os.path.join(t, n)) as f:
                    out[n] = f.read()
        return out
    finally:
        shutil.rmtree(t)


def pem_material(regen):
    d = os.path.join(HERE, "pem")
    if regen or not os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for n, text in make_pem().items():
            with open(os.path.join(d, n), "w") as f:
                f.write(text)
    m = {}
    for n in os.listdir(d):
        with open(os.path.join(d, n)) as f:
            m[n] = f.read()
    return m


def pem_seeds(m):
    fresh("pem")
    leaf, root, key = m["fuzz-leaf.pem"], m["fuzz-root.pem"], m["fuzz-leaf.key"]
    write("pem", "ec-chain-and-key", leaf + root + key)
    write("pem", "ec-split", leaf + root + "\0" + key)
    write("pem", "ec-sec1-key", leaf + "\0" + m["fuzz-leaf-sec1.key"])
    write("pem", "rsa-pkcs8", m["rsa.pem"] + "\0" + m["rsa.key"])
    write("pem", "rsa-traditional", m["rsa.pem"] + "\0" + m["rsa-trad.key"])
    write("pem", "wrong-key", leaf + "\0" + m["other-leaf.key"])
    write("pem", "wrong-order", root + leaf + "\0" + key)
    write("pem", "wrong-issuer", leaf + m["other-root.pem"] + "\0" + key)
    write("pem", "comments-and-crlf",
          ("# site certificate\n" + leaf + "\ntrailing words\n").replace("\n", "\r\n") + "\0" +
          "Bag Attributes\n" + key)
    write("pem", "damaged-block", leaf + root.replace("A", "!", 1) + "\0" + key)
    # The leaf with its subjectKeyIdentifier relabelled keyUsage (an OCTET STRING where a BIT
    # STRING belongs): the X509 parser takes it, BoringSSL's TLS stack does not (a find).
    der = base64.b64decode("".join(leaf.splitlines()[1:-1]))
    der = der.replace(b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x0f", 1)
    b64 = base64.b64encode(der).decode()
    bad = "-----BEGIN CERTIFICATE-----\n" + "\n".join(
        b64[i:i + 64] for i in range(0, len(b64), 64)) + "\n-----END CERTIFICATE-----\n"
    write("pem", "keyusage-not-bitstring", bad + "\0" + key)


# --- ACME ------------------------------------------------------------------------------------

CA = "https://ca.test"
JSON = "Content-Type: application/json"
PROBLEM = "Content-Type: application/problem+json"


def resp(status, headers=(), body=""):
    return "\n".join([str(status), *headers, "", body])


def nonce(i):
    return f"Replay-Nonce: oFvnlFP1wIhRlYS2jTaXbA{i}"


DIRECTORY = """{
  "newNonce": "https://ca.test/acme/new-nonce",
  "newAccount": "https://ca.test/acme/new-account",
  "newOrder": "https://ca.test/acme/new-order",
  "newAuthz": "https://ca.test/acme/new-authz",
  "revokeCert": "https://ca.test/acme/revoke-cert",
  "keyChange": "https://ca.test/acme/key-change",
  "renewalInfo": "https://ca.test/acme/renewal-info",
  "meta": {
    "termsOfService": "https://ca.test/acme/terms/2017-5-30",
    "website": "https://www.example.com/",
    "caaIdentities": ["example.com"],
    "externalAccountRequired": false
  }
}"""

ACCOUNT = """{
  "status": "valid",
  "contact": ["mailto:admin@example.com"],
  "orders": "https://ca.test/acme/acct/evOfKhNU60wg/orders"
}"""


def order(status, extra=""):
    return """{
  "status": "%s",
  "expires": "2016-01-05T14:09:07.99Z",
  "identifiers": [
    { "type": "dns", "value": "a.example.com" },
    { "type": "dns", "value": "b.example.com" }
  ],
  "notBefore": "2016-01-01T00:00:00Z",
  "notAfter": "2016-01-08T00:00:00Z",
  "authorizations": [
    "https://ca.test/acme/authz/PAniVnsZcis",
    "https://ca.test/acme/authz/r4HqLzrSrpI"
  ],
  "finalize": "https://ca.test/acme/order/TOlocE8rfgo/finalize"%s
}""" % (status, extra)


def authz(name, status, chal_status="pending", error=""):
    return """{
  "status": "%s",
  "expires": "2016-01-02T14:09:30Z",
  "identifier": { "type": "dns", "value": "%s" },
  "challenges": [
    { "type": "http-01", "url": "https://ca.test/acme/chall/prV_B7yEyA4",
      "status": "%s", "token": "DGyRejmCefe7v4NfDGDKfA"%s },
    { "type": "dns-01", "url": "https://ca.test/acme/chall/Rg5dV14Gh1Q",
      "token": "IlirfxKKXAsHtmzK29Pj8A" },
    { "type": "tls-alpn-01", "url": "https://ca.test/acme/chall/qwe12",
      "status": "%s", "token": "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"%s }
  ],
  "wildcard": false
}""" % (status, name, chal_status, error, chal_status, error)


def setup(first=1):
    """directory, nonce, account: the three answers before every order."""
    return [
        resp(200, [JSON], DIRECTORY),
        resp(200, [nonce(first), "Cache-Control: no-store"]),
        resp(201, [JSON, nonce(first + 1), f"Location: {CA}/acme/acct/evOfKhNU60wg"], ACCOUNT),
    ]


def placed(i):
    return resp(201, [JSON, nonce(i), f"Location: {CA}/acme/order/TOlocE8rfgo"], order("pending"))


def script(opts, responses):
    return opts + "\n" + "\n%%\n".join(responses)


def acme_seeds(m):
    fresh("acme")
    chain = m["fuzz-leaf.pem"] + m["fuzz-root.pem"]
    other = m["other-leaf.pem"] + m["other-root.pem"]
    pemct = "Content-Type: application/pem-certificate-chain"
    valid = order("valid", ',\n  "certificate": "https://ca.test/acme/cert/mAt3xBGaobw"')
    tail = [
        resp(200, [JSON, nonce(20)], order("processing")),
        resp(200, [JSON, nonce(21), "Retry-After: 1"], order("processing")),
        resp(200, [JSON, nonce(22)], valid),
    ]
    both = [
        resp(200, [JSON, nonce(10)], authz("a.example.com", "pending")),
        resp(200, [JSON, nonce(11)], '{"type":"http-01","status":"processing"}'),
        resp(200, [JSON, nonce(12), "Retry-After: 2"], authz("a.example.com", "pending")),
        resp(200, [JSON, nonce(13)], authz("a.example.com", "valid", "valid")),
        resp(200, [JSON, nonce(14)], authz("b.example.com", "valid", "valid")),
    ]
    write("acme", "http01-full",
          script("m", setup() + [placed(3)] + both + tail +
                 [resp(200, [pemct, nonce(23)], chain)]))
    write("acme", "tlsalpn01-two-names",
          script("a2w", setup() + [placed(3)] + both + tail +
                 [resp(200, [pemct, nonce(23)], chain)]))
    # dns-01: the record is published (through the fake DNS provider) before the CA is told;
    # "f" makes the publication fail, which ends the order before any challenge POST.
    # Both authorizations are fetched (and their records published) before either challenge.
    dns_both = [
        resp(200, [JSON, nonce(10)], authz("a.example.com", "pending")),
        resp(200, [JSON, nonce(11)], authz("b.example.com", "pending")),
        resp(200, [JSON, nonce(12)], '{"type":"dns-01","status":"processing"}'),
        resp(200, [JSON, nonce(13), "Retry-After: 2"], authz("a.example.com", "pending")),
        resp(200, [JSON, nonce(14)], authz("a.example.com", "valid", "valid")),
        resp(200, [JSON, nonce(15)], '{"type":"dns-01","status":"processing"}'),
        resp(200, [JSON, nonce(16)], authz("b.example.com", "valid", "valid")),
    ]
    write("acme", "dns01-two-names",
          script("d2", setup() + [placed(3)] + dns_both + tail +
                 [resp(200, [pemct, nonce(23)], chain)]))
    write("acme", "dns01-publish-fails",
          script("df", setup() + [placed(3)] + both[:1]))
    eab_dir = DIRECTORY.replace('"externalAccountRequired": false',
                                '"externalAccountRequired": true')
    write("acme", "eab-required",
          script("e", [resp(200, [JSON], eab_dir)] + setup()[1:] + [placed(3)]))
    write("acme", "eab-missing", script("", [resp(200, [JSON], eab_dir)]))
    link = [f'Link: <{CA}/acme/cert/mAt3xBGaobw/1>;rel="alternate"',
            f'Link: <{CA}/acme/directory>;rel="index", <{CA}/acme/cert/mAt3xBGaobw/2>; '
            'rel="alternate"']
    write("acme", "preferred-chain-alternate",
          script("p", setup() + [placed(3)] + both + tail +
                 [resp(200, [pemct, nonce(23)] + link, other),
                  resp(200, [pemct, nonce(24)], chain)]))
    write("acme", "preferred-chain-missing",
          script("p", setup() + [placed(3)] + both + tail +
                 [resp(200, [pemct, nonce(23)] + link[:1], other),
                  resp(200, [pemct, nonce(24)], other)]))
    bad_nonce = resp(400, [PROBLEM, nonce(30)], """{
  "type": "urn:ietf:params:acme:error:badNonce",
  "detail": "JWS has an invalid anti-replay nonce"
}""")
    write("acme", "bad-nonce-retry",
          script("", setup()[:2] + [bad_nonce, bad_nonce] + setup()[2:] + [placed(3)]))
    write("acme", "rate-limited",
          script("", setup() + [resp(429, [PROBLEM, nonce(3), "Retry-After: 3600"], """{
  "type": "urn:ietf:params:acme:error:rateLimited",
  "detail": "too many certificates already issued for exact set of domains"
}""")]))
    write("acme", "subproblems", script("2", setup() + [resp(403, [PROBLEM, nonce(3)], """{
    "type": "urn:ietf:params:acme:error:malformed",
    "detail": "Some of the identifiers requested were rejected",
    "subproblems": [
        {
            "type": "urn:ietf:params:acme:error:malformed",
            "detail": "Invalid underscore in DNS name \\"_example.org\\"",
            "identifier": { "type": "dns", "value": "_example.org" }
        },
        {
            "type": "urn:ietf:params:acme:error:rejectedIdentifier",
            "detail": "This CA will not issue for \\"example.net\\"",
            "identifier": { "type": "dns", "value": "example.net" }
        }
    ]
}""")]))
    write("acme", "replaces-refused",
          script("r", setup() + [resp(409, [PROBLEM, nonce(3)], """{
  "type": "urn:ietf:params:acme:error:alreadyReplaced",
  "detail": "the certificate has already been replaced"
}"""), placed(4)]))
    write("acme", "authz-invalid",
          script("", setup() + [placed(3)] + both[:2] + [
              resp(200, [JSON, nonce(12)], authz("a.example.com", "invalid", "invalid", """,
      "error": { "type": "urn:ietf:params:acme:error:connection",
                 "detail": "Connection refused", "status": 400,
                 "subproblems": [ { "type": "urn:ietf:params:acme:error:dns",
                   "identifier": { "type": "dns", "value": "a.example.com" } } ] }""")
                   )]))
    write("acme", "order-invalid",
          script("", setup() + [placed(3)] + both + [resp(200, [JSON, nonce(20)], order(
              "invalid", ',\n  "error": { "type": "urn:ietf:params:acme:error:badCSR", '
              '"detail": "CSR names do not match" }'))]))
    write("acme", "no-challenge-offered",
          script("", setup() + [placed(3), resp(200, [JSON, nonce(10)], """{
  "status": "pending", "identifier": {"type": "dns", "value": "a.example.com"},
  "challenges": [ {"type": "dns-01", "url": "https://ca.test/c/1", "token": "t"} ] }""")]))
    write("acme", "transport-error", script("", setup()[:1] + ["ERR"]))
    write("acme", "not-a-directory", script("", [resp(200, ["Content-Type: text/html"],
                                                      "<html>hello</html>")]))
    ari = """{
  "suggestedWindow": {
    "start": "2025-01-02T04:00:00Z",
    "end": "2025-01-03T04:00:00.123+02:00"
  },
  "explanationURL": "https://ca.test/docs/ari"
}"""
    write("acme", "ari-window",
          script("ir", [resp(200, [JSON], DIRECTORY),
                        resp(200, [JSON, "Retry-After: 21600"], ari)]))
    write("acme", "ari-unsupported",
          script("i", [resp(200, [JSON], DIRECTORY.replace('"renewalInfo"', '"other"'))]))
    write("acme", "ari-retry-after-date",
          script("i", [resp(200, [JSON], DIRECTORY),
                       resp(503, ["Retry-After: Wed, 21 Oct 2015 07:28:00 GMT"], "")]))
    write("acme", "ari-bad-window",
          script("i", [resp(200, [JSON], DIRECTORY), resp(200, [JSON], """{
  "suggestedWindow": { "start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z" } }""")]))


# --- site files -------------------------------------------------------------------------------


def config_seeds():
    fresh("config")
    write("config", "default", "# moat site file: one site per line.\nlocalhost  127.0.0.1:8080\n")
    write("config", "every-option", """\xef\xbb\xbf# every option once
chat.example.com,www.example.com 127.0.0.1:8080 tls=acme email=admin@example.com \
ca=https://acme-v02.api.letsencrypt.org/directory,https://acme.example/dir \
preferred_chain="ISRG Root X1" eab_kid=kid-1 eab_hmac=c2VjcmV0 hsts=on
files.example.com h:1,h:2 tls=cert.pem,/etc/key.pem max_body=512KiB lb=cookie pool_idle=500ms
internal.lan unix:/run/app.sock tls=internal max_body=none lb=least_conn h2_websocket=off
http://plain.example.com:8081 http://127.0.0.1:9000 connect_timeout=2s read_timeout=1h \
header_timeout=30s keepalive_timeout=5m ws_idle_timeout=1h \
trusted_proxies=10.0.0.0/8,fd00::/8,192.168.1.1
[::1]:8443,192.168.1.10,https://[fd00::5]:8443/ [::1]:3000 tls=auto hsts=off
\tindented.example.com\t127.0.0.1:1   # trailing comment\r
""")
    write("config", "errors", """a.example.com 127.0.0.1:1 max_bdy=10M hsts=maybe lb=random
*.example.com 127.0.0.1:8080
a.example.com 127.0.0.1:2 tls=cert.pem email=a@b@example.com
b.example.com foo connect_timeout=0 max_body=99999999999G "unterminated
""")
    write("config", "command-line", "chat.example.com 127.0.0.1:8080 hsts=on max_body=1G\n")
    write("config", "dns01", """*.ai.example.com,ai.example.com 127.0.0.1:8080 dns=rfc2136 \
dns_server=ns1.example.com:53 dns_tsig=/etc/moat/tsig.key dns_resolver=127.0.0.1:5353 dns_wait=30s
chat.home.example.com 127.0.0.1:8080 dns=cloudflare dns_token_file=/etc/moat/cf.token \
dns_api=http://127.0.0.1:8081/client/v4
*.example.org h:1 dns=rfc2136
*.files.example.com h:1 tls=cert.pem,key.pem
""")


# --- control socket requests ------------------------------------------------------------------


def ctlproto_seeds():
    fresh("ctlproto")
    seeds = {
        "reload": '{"cmd":"reload"}\n',
        "stop-grace": '{"cmd":"stop","grace":5}\n',
        "renew-name-force": '{"cmd":"renew","name":"chat.example.com","force":true}',
        "health": '{"cmd":"health"}',
        "status-extra-member": '{"cmd":"status","future":[1,{"a":null}]}\n',
        "unknown-cmd": '{"cmd":"frobnicate"}',
        "grace-for-reload": '{"cmd":"reload","grace":3}',
        "nul-in-name": '{"cmd":"renew","name":"a\\u0000b"}',
        "duplicate-key": '{"cmd":"stop","cmd":"reload"}',
        "not-object": '["cmd","stop"]',
        "truncated": '{"cmd":"sto',
    }
    for k, v in seeds.items():
        write("ctlproto", k, v)


# --- HTTP/1.1 ----------------------------------------------------------------------------------


def http1_seeds():
    fresh("http1")
    # The first byte's low bit says whether the response answers a HEAD request.
    s = {
        "get": b"\x00GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\n"
               b"User-Agent: curl/8.0\r\nAccept: */*\r\n\r\n",
        "post-length": b"\x00POST /api HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 13\r\n\r\n{\"a\": \"bcd\"}\n",
        "post-chunked": b"\x00POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                        b"Expect: 100-continue\r\n\r\n",
        "http10-keepalive": b"\x00GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "absolute-form": b"\x00GET http://example.com:8080/p HTTP/1.1\r\nHost: example.com:8080\r\n"
                         b"Connection: close, TE\r\nTE: trailers\r\n\r\n",
        "connect": b"\x00CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "options-star": b"\x00OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        "websocket": b"\x00GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n",
        "obs-fold-bad": b"\x00GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n",
        "two-lengths": b"\x00POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                       b"Content-Length: 6\r\n\r\nhello",
        "response-200": b"\x00HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n"
                        b"Set-Cookie: a=b\r\nSet-Cookie: c=d\r\n\r\nhello",
        "response-chunked": b"\x00HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "response-head": b"\x01HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "response-204": b"\x00HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        "response-101": b"\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n",
        "response-100": b"\x00HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        "response-http10": b"\x00HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n",
        "chunked-body": b"\x004\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\n in \r\n\r\nchunks."
                        b"\r\n0\r\n\r\n",
        "chunked-trailers": b"\x00a\r\n0123456789\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\n",
        "chunked-bad": b"\x00fffffffffffffffff\r\n",
    }
    for k, v in s.items():
        write("http1", k, v)


# --- HTTP/2 -----------------------------------------------------------------------------------


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack(">I", stream) + payload


def lit(name, value):
    """HPACK literal without indexing, new name, no Huffman."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def lit_idx(index, value):
    """HPACK literal with incremental indexing, indexed name (6-bit prefix), no Huffman."""
    return bytes([0x40 | index]) + bytes([len(value)]) + value


GET_HEADERS = b"\x82\x87\x84" + lit_idx(1, b"example.com") + lit(b"user-agent", b"fuzz")
SETTINGS = frame(4, 0, 0, struct.pack(">HI", 3, 100) + struct.pack(">HI", 4, 65535) +
                 struct.pack(">HI", 8, 1))
ACK = frame(4, 1, 0)


def h2_input(frames, odd):
    """The h2 target reads pieces: a length byte (1 + b % 64) then that many bytes. Odd input
    sizes turn on extended CONNECT."""
    data = b"".join(frames)
    out = b""
    for i in range(0, len(data), 64):
        piece = data[i:i + 64]
        out += bytes([len(piece) - 1]) + piece
    if (len(out) % 2 == 1) != odd:
        out += frame(4, 1, 0)[:1]  # one stray byte flips the parity; it is the last piece's
    return out


def h2_seeds():
    fresh("h2")
    post = b"\x83\x87" + lit_idx(4, b"/upload") + lit_idx(1, b"a") + \
        lit(b"content-length", b"10")
    ws = b"\x02\x07CONNECT" + lit(b":protocol", b"websocket") + b"\x87" + \
        lit_idx(4, b"/chat") + lit_idx(1, b"a") + lit(b"sec-websocket-version", b"13")
    seeds = {
        "get": ([SETTINGS, ACK, frame(1, 5, 1, GET_HEADERS)], False),
        "post-data": ([SETTINGS, frame(1, 4, 1, post), frame(0, 0, 1, b"01234"),
                       frame(8, 0, 1, struct.pack(">I", 1000)), frame(0, 1, 1, b"56789")], False),
        "continuation": ([SETTINGS, frame(1, 1, 3, GET_HEADERS[:5]),
                          frame(9, 4, 3, GET_HEADERS[5:])], False),
        "priority-padding": ([SETTINGS, frame(1, 0x2d, 5, b"\x03" + b"\x80\x00\x00\x00\x10" +
                                              GET_HEADERS + b"\0\0\0"),
                              frame(2, 0, 5, b"\x00\x00\x00\x03\x20")], False),
        "control-frames": ([SETTINGS, frame(6, 0, 0, b"12345678"), frame(8, 0, 0,
                            struct.pack(">I", 65536)), frame(1, 4, 7, GET_HEADERS),
                            frame(3, 0, 7, struct.pack(">I", 8)),
                            frame(7, 0, 0, struct.pack(">II", 7, 0) + b"bye")], False),
        "many-streams": ([SETTINGS] + [frame(1, 5, i, GET_HEADERS) for i in range(1, 20, 2)],
                         False),
        "websocket": ([SETTINGS, frame(1, 4, 1, ws), frame(0, 0, 1, b"\x81\x05hello")], True),
        "settings-on-stream": ([frame(4, 0, 1, b"x")], False),
        "data-after-end": ([SETTINGS, frame(1, 5, 1, GET_HEADERS), frame(0, 1, 1, b"x")], False),
        "even-stream-zero-window": ([SETTINGS, frame(1, 5, 2, GET_HEADERS),
                                     frame(8, 0, 0, b"\0\0\0\0")], False),
    }
    for k, (frames, odd) in seeds.items():
        write("h2", k, h2_input(frames, odd))


# --- DNS (dns_fuzz: first byte 0 = a DNS message, 1 = a TSIG key file) ------------------------


def dns_name(n):
    out = b""
    for lab in n.rstrip(".").split("."):
        out += bytes([len(lab)]) + lab.encode()
    return out + b"\0"


def dns_rr(owner, rtype, rdata, ttl=60, cls=1):
    return owner + struct.pack(">HHIH", rtype, cls, ttl, len(rdata)) + rdata


def dns_seeds():
    fresh("dns")
    q = dns_name("_acme-challenge.example.test") + struct.pack(">HH", 16, 1)
    ptr = b"\xc0\x0c"
    txt = dns_rr(ptr, 16, b"\x2bgfj9Xq...Rg85nM-value-of-43-characters-xx" + b"\x03abc")
    write("dns", "txt-answer", b"\0" + struct.pack(">HHHHHH", 1, 0x8580, 1, 2, 0, 0) + q + txt +
          dns_rr(ptr, 16, b"\x05other"))
    # NXDOMAIN with the zone's SOA in the authority section (how the zone is found).
    soa = dns_rr(b"\xc0\x1c", 6, b"\x03ns1\xc0\x1c" + b"\x0ahostmaster\xc0\x1c" +
                 struct.pack(">IIIII", 1, 3600, 600, 86400, 60))
    write("dns", "soa-authority", b"\0" + struct.pack(">HHHHHH", 2, 0x8583, 1, 0, 1, 0) + q + soa)
    nsq = dns_name("example.test") + struct.pack(">HH", 2, 1)
    write("dns", "ns-answer", b"\0" + struct.pack(">HHHHHH", 3, 0x8580, 1, 2, 0, 1) + nsq +
          dns_rr(ptr, 2, b"\x03ns1\xc0\x0c") + dns_rr(ptr, 2, b"\x03ns2\xc0\x0c") +
          dns_rr(b"\x03ns1\xc0\x0c", 1, bytes([127, 0, 0, 1])))
    # An UPDATE answer carrying a TSIG record (BADSIG, no MAC) and one with a 32-byte MAC.
    upd = dns_name("example.test") + struct.pack(">HH", 6, 1)
    alg = dns_name("hmac-sha256")
    for name, err, mac in (("update-badsig", 16, b""), ("update-signed", 0, b"\x11" * 32)):
        tsig = alg + struct.pack(">HIHH", 0, 1700000000, 300, len(mac)) + mac + \
            struct.pack(">HHH", 4, err, 0)
        write("dns", name, b"\0" + struct.pack(">HHHHHH", 4, 0xA800 | (9 if err else 0), 1, 0, 0, 1) +
              upd + dns_rr(dns_name("moat-test"), 250, tsig, ttl=0, cls=255))
    write("dns", "pointer-loop", b"\0" + struct.pack(">HHHHHH", 5, 0x8180, 1, 0, 0, 0) +
          b"\xc0\x0c\x00\x01\x00\x01")
    write("dns", "truncated", b"\0" + struct.pack(">HHHHHH", 6, 0x8380, 1, 0, 0, 0) + q)
    write("dns", "key-file", b"\1key \"moat-test\" {\n\talgorithm hmac-sha256;\n"
          b"\tsecret \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\";\n};\n")
    write("dns", "key-comments", b"\1# x\n/* y */ key k. { secret \"c2Vj\"; // z\n"
          b" algorithm HMAC-SHA256; };")
    write("dns", "key-sha512", b"\1key \"x\" { algorithm hmac-sha512; secret \"c2Vj\"; };")
# --- PostgreSQL backend messages ---------------------------------------------------------


def pgmsg(t, body=b""):
    return t.encode() + struct.pack(">I", len(body) + 4) + body


def pg_error(t, fields):
    return pgmsg(t, b"".join(k.encode() + v.encode() + b"\0" for k, v in fields) + b"\0")


def pg_row(cols):
    out = struct.pack(">H", len(cols))
    for c in cols:
        out += struct.pack(">i", -1) if c is None else struct.pack(">I", len(c)) + c
    return pgmsg("D", out)


def pgwire_seeds():
    """pgwire_fuzz: a stream of backend messages as a server sends them."""
    fresh("pgwire")
    ready = pgmsg("Z", b"I")
    sasl = pgmsg("R", struct.pack(">I", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    cont = pgmsg("R", struct.pack(">I", 11) + b"r=fuzznonceSERVER,s=QUJDREVGR0g=,i=2")
    final = pgmsg("R", struct.pack(">I", 12) + b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    ok = pgmsg("R", struct.pack(">I", 0))
    params = pgmsg("S", b"server_version\x0015.18\0") + pgmsg("K", struct.pack(">ii", 42, 7))
    desc = pgmsg("T", struct.pack(">H", 2) + b"key\0" + struct.pack(">IHIhih", 0, 1, 17, -1, -1, 0)
                 + b"value\0" + struct.pack(">IHIhih", 0, 2, 25, -1, -1, 0))
    seeds = {
        "login": sasl + cont + final + ok + params + ready,
        "select": pgmsg("1") + pgmsg("2") + desc + pg_row([b"\\x6b", b"v"]) +
                  pg_row([b"\\x6c", None]) + pgmsg("C", b"SELECT 2\0") + ready,
        "error": pg_error("E", [("S", "ERROR"), ("V", "ERROR"), ("C", "42P01"),
                                ("M", 'relation "moat.kv" does not exist'), ("P", "15")])
                 + pgmsg("Z", b"E"),
        "fatal-login": pg_error("E", [("S", "FATAL"), ("V", "FATAL"), ("C", "28P01"),
                                      ("M", 'password authentication failed for user "moat"')]),
        "notice-notify": pg_error("N", [("S", "NOTICE"), ("C", "42P06"), ("M", "skipping"),
                                        ("D", "detail"), ("H", "hint")])
                         + pgmsg("A", struct.pack(">i", 7) + b"moat\0cert:acme:a\0") + ready,
        "md5": pgmsg("R", struct.pack(">I", 5) + b"salt"),
        "negotiate": pgmsg("v", struct.pack(">ii", 0, 1) + b"_pq_.x\0") + pgmsg("t", b"\0\x01\0\0\0\x19"),
        "misc": pgmsg("n") + pgmsg("s") + pgmsg("I") + pgmsg("3") + pgmsg("C", b"INSERT 0 1\0"),
    }
    for k, v in seeds.items():
        write("pgwire", k, v)


def main():
    m = pem_material("--pem" in sys.argv)
    pem_seeds(m)
    acme_seeds(m)
    config_seeds()
    ctlproto_seeds()
    http1_seeds()
    h2_seeds()
    dns_seeds()
    pgwire_seeds()


if __name__ == "__main__":
    main()
