/* Bench helper for the `ws` metric: opens N socket.io websockets through a TLS proxy on
 * 127.0.0.1:PORT, at most C handshakes (TLS + websocket + socket.io connect) in flight, and
 * holds them, answering every Engine.IO ping, until stdin gives a line or EOF.
 *
 *   ws_hold PORT N C MODE [OPEN_DEADLINE_S]      MODE: mixed | h1 | h2
 *
 * mixed: even-numbered connections use HTTP/1.1 (ALPN http/1.1, GET with Upgrade: websocket,
 * expect 101), odd-numbered ones HTTP/2 (ALPN h2, the server's SETTINGS must carry
 * ENABLE_CONNECT_PROTOCOL=1, then one RFC 8441 extended CONNECT stream, expect :status 200,
 * the websocket carried in DATA frames). h1 / h2: all of them that way.
 *
 * Over the websocket it speaks Engine.IO v4 / Socket.IO v5 as a browser's client does: the
 * server's open packet `0{...,"pingInterval":...}`, then `40` (connect to namespace /), the
 * server's `40{"sid":...}`; from then on the connection is open and every ping `2` gets a pong
 * `3` (client frames masked, RFC 6455). Websocket-level pings get pongs too (uvicorn sends
 * them). An open connection that closes, gets a close or RST_STREAM, or sees no ping for more
 * than 2 x pingInterval is lost.
 *
 * Output, one JSON line each: when every connection is open, failed, or the opening deadline
 * (default 120 s) has passed:
 *   {"open":..,"failed":..,"h1":..,"h2":..,"open_s":..,"why":{reason:count}}
 * and after stdin's line: {"held":..,"lost":..,"pongs":..,"min_pongs":..,"why":{...}} where
 * held counts the connections open at the first line and still open and pinged at the end,
 * pongs the Engine.IO pongs sent during the hold, min_pongs the fewest any held one sent.
 *
 * The HTTP/2 and HPACK bytes are built by hand (literals without indexing, no Huffman); the
 * only response header read is :status, which servers send as the static-table index 0x88 for
 * 200. Built by bench.py against BoringSSL. */
#include "bench_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/base64.h>
#include <openssl/err.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_TLS, ST_H2_SETTINGS, ST_HEAD, ST_EIO_OPEN, ST_SIO_CONNECT, ST_OPEN, ST_DEAD };

/* Why connections failed or were lost; printed as the "why" object. */
enum {
    WHY_CONNECT,
    WHY_TLS,
    WHY_NO_H2,
    WHY_NO_ECP,
    WHY_STATUS,
    WHY_ACCEPT,
    WHY_PROTOCOL,
    WHY_CLOSED,
    WHY_RST,
    WHY_WS_CLOSE,
    WHY_SIO_ERROR,
    WHY_SILENT,
    WHY_DEADLINE,
    WHY_N
};
static const char *why_names[WHY_N] = {
    "connect",           "tls",      "no_h2_alpn",   "no_connect_protocol", "bad_status",
    "bad_accept",        "protocol", "closed",       "rst_stream",          "ws_close",
    "sio_connect_error", "no_ping",  "open_deadline"};

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

typedef struct {
    int fd;
    SSL *ssl;
    unsigned char h2, st, ecp, held;
    uint32_t events; /* the epoll interest now set */
    buf_t in;        /* h2: frames not yet complete */
    buf_t ws;        /* websocket bytes (h1: the response head first) */
    buf_t out;       /* bytes for SSL_write */
    size_t wpending; /* length of an SSL_write that must be retried as is */
    uint32_t dwin;   /* DATA bytes received and not yet given back with WINDOW_UPDATE */
    int64_t last_ping_ms;
    int ping_interval_ms;
    unsigned pongs_hold;
} ws_conn_t;

static const char ws_key[] = "dGhlIHNhbXBsZSBub25jZQ==";
static const char path[] = "/socket.io/?EIO=4&transport=websocket";
static const unsigned char alpn_h1[] = "\x08http/1.1", alpn_h2[] = "\x02h2";

static int ep;
static int opened, failed, inflight, lost, holding;
static unsigned why_open[WHY_N], why_hold[WHY_N];
static unsigned char rbuf[16384];
static uint32_t rng = 2463534242u;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint32_t xorshift(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

static void buf_append(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p)
            abort();
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void buf_consume(buf_t *b, size_t n)
{
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static void set_events(ws_conn_t *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->events = events;
}

static void conn_fail(ws_conn_t *c, int why)
{
    if (c->st == ST_DEAD)
        return;
    if (c->st == ST_OPEN) {
        if (holding && c->held)
            lost++, why_hold[why]++;
        else
            why_open[why]++;
        opened--;
    } else {
        why_open[why]++;
        inflight--;
    }
    failed++;
    c->st = ST_DEAD;
    SSL_free(c->ssl);
    close(c->fd);
    c->ssl = NULL;
    free(c->in.p), free(c->ws.p), free(c->out.p);
    memset(&c->in, 0, sizeof c->in), memset(&c->ws, 0, sizeof c->ws);
    memset(&c->out, 0, sizeof c->out);
}

/* Writes what is queued; 0, or -1 when the connection failed. */
static int flush(ws_conn_t *c)
{
    while (c->out.len > 0) {
        if (c->wpending == 0)
            c->wpending = c->out.len;
        int r = SSL_write(c->ssl, c->out.p, (int)c->wpending);
        if (r > 0) {
            buf_consume(&c->out, (size_t)r);
            c->wpending = 0;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        ERR_clear_error();
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) {
            conn_fail(c, WHY_CLOSED);
            return -1;
        }
        set_events(c, EPOLLIN | EPOLLOUT);
        return 0;
    }
    set_events(c, EPOLLIN);
    return 0;
}

static void h2_frame_head(buf_t *b, size_t len, int type, int flags, uint32_t stream)
{
    unsigned char h[9] = {
        (unsigned char)(len >> 16),    (unsigned char)(len >> 8),    (unsigned char)len,
        (unsigned char)type,           (unsigned char)flags,         (unsigned char)(stream >> 24),
        (unsigned char)(stream >> 16), (unsigned char)(stream >> 8), (unsigned char)stream};
    buf_append(b, h, sizeof h);
}

static void hpack_literal(buf_t *b, const char *name, const char *value)
{
    size_t nl = strlen(name), vl = strlen(value);
    unsigned char h[2] = {0x00, (unsigned char)nl}; /* without indexing, new name, no Huffman */
    buf_append(b, h, 2);
    buf_append(b, name, nl);
    h[0] = (unsigned char)vl;
    buf_append(b, h, 1);
    buf_append(b, value, vl);
}

static void send_request(ws_conn_t *c)
{
    if (!c->h2) {
        char req[512];
        int n = snprintf(req, sizeof req,
                         "GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n",
                         path, ws_key);
        buf_append(&c->out, req, (size_t)n);
        return;
    }
    buf_t hb = {0};
    hpack_literal(&hb, ":method", "CONNECT");
    hpack_literal(&hb, ":protocol", "websocket");
    hpack_literal(&hb, ":scheme", "https");
    hpack_literal(&hb, ":path", path);
    hpack_literal(&hb, ":authority", "localhost");
    hpack_literal(&hb, "sec-websocket-version", "13");
    h2_frame_head(&c->out, hb.len, 1, 0x4 /* END_HEADERS */, 1);
    buf_append(&c->out, hb.p, hb.len);
    free(hb.p);
}

/* One masked client frame; over h2 inside a DATA frame on stream 1. */
static void send_ws(ws_conn_t *c, int opcode, const void *payload, size_t n)
{
    unsigned char f[6 + 125];
    if (n > 125)
        n = 125;
    uint32_t m = xorshift();
    f[0] = (unsigned char)(0x80 | opcode);
    f[1] = (unsigned char)(0x80 | n);
    memcpy(f + 2, &m, 4);
    for (size_t i = 0; i < n; i++)
        f[6 + i] = ((const unsigned char *)payload)[i] ^ f[2 + i % 4];
    if (c->h2)
        h2_frame_head(&c->out, 6 + n, 0, 0, 1);
    buf_append(&c->out, f, 6 + n);
}

static void send_text(ws_conn_t *c, const char *s)
{
    send_ws(c, 1, s, strlen(s));
}

/* An Engine.IO packet (one websocket text message). */
static void on_message(ws_conn_t *c, const unsigned char *p, size_t n)
{
    if (n == 0)
        return;
    if (p[0] == '2') { /* ping, whatever the state */
        send_text(c, "3");
        c->last_ping_ms = now_ms();
        if (holding && c->held)
            c->pongs_hold++;
        return;
    }
    if (p[0] == '1') {
        conn_fail(c, WHY_WS_CLOSE);
        return;
    }
    switch (c->st) {
    case ST_EIO_OPEN: {
        if (p[0] != '0') {
            conn_fail(c, WHY_PROTOCOL);
            return;
        }
        char json[512];
        size_t k = n < sizeof json - 1 ? n : sizeof json - 1;
        memcpy(json, p, k);
        json[k] = 0;
        const char *pi = strstr(json, "\"pingInterval\":");
        c->ping_interval_ms = pi ? atoi(pi + 15) : 25000;
        if (c->ping_interval_ms <= 0)
            c->ping_interval_ms = 25000;
        send_text(c, "40");
        c->st = ST_SIO_CONNECT;
        break;
    }
    case ST_SIO_CONNECT:
        if (n >= 2 && p[0] == '4' && p[1] == '0') {
            c->st = ST_OPEN;
            c->last_ping_ms = now_ms();
            inflight--;
            opened++;
        } else if (n >= 2 && p[0] == '4' && p[1] == '4') {
            conn_fail(c, WHY_SIO_ERROR);
        }
        break;
    default: break; /* events and the like are not for us */
    }
}

/* The response head (h1) and websocket frames in c->ws. */
static void on_ws_bytes(ws_conn_t *c)
{
    if (c->st == ST_HEAD && !c->h2) {
        unsigned char *end = memmem(c->ws.p, c->ws.len, "\r\n\r\n", 4);
        if (!end) {
            if (c->ws.len > 8192)
                conn_fail(c, WHY_PROTOCOL);
            return;
        }
        size_t hl = (size_t)(end - c->ws.p) + 4;
        if (c->ws.len < 12 || memcmp(c->ws.p, "HTTP/1.1 101", 12) != 0) {
            conn_fail(c, WHY_STATUS);
            return;
        }
        /* Sec-WebSocket-Accept must be base64(SHA-1(key + GUID)). */
        char want[64], cat[128];
        unsigned char sha[SHA_DIGEST_LENGTH];
        int cl = snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", ws_key);
        SHA1((const unsigned char *)cat, (size_t)cl, sha);
        EVP_EncodeBlock((unsigned char *)want, sha, sizeof sha);
        char head[8193];
        memcpy(head, c->ws.p, hl);
        head[hl] = 0;
        const char *a = strcasestr(head, "\r\nsec-websocket-accept:");
        if (a)
            a += 23;
        while (a && *a == ' ')
            a++;
        if (!a || strncmp(a, want, strlen(want)) != 0) {
            conn_fail(c, WHY_ACCEPT);
            return;
        }
        buf_consume(&c->ws, hl);
        c->st = ST_EIO_OPEN;
    }
    while (c->st != ST_DEAD && c->ws.len >= 2) {
        const unsigned char *p = c->ws.p;
        size_t len = p[1] & 0x7f, hl = 2;
        if (p[1] & 0x80) { /* servers do not mask */
            conn_fail(c, WHY_PROTOCOL);
            return;
        }
        if (len == 126) {
            if (c->ws.len < 4)
                return;
            len = (size_t)p[2] << 8 | p[3], hl = 4;
        } else if (len == 127) {
            if (c->ws.len < 10)
                return;
            len = 0;
            for (int i = 2; i < 10; i++)
                len = len << 8 | p[i];
            hl = 10;
            if (len > (1u << 20)) {
                conn_fail(c, WHY_PROTOCOL);
                return;
            }
        }
        if (c->ws.len < hl + len)
            return;
        int opcode = p[0] & 0x0f;
        if (opcode == 1)
            on_message(c, p + hl, len);
        else if (opcode == 8)
            conn_fail(c, WHY_WS_CLOSE);
        else if (opcode == 9)
            send_ws(c, 10, p + hl, len);
        if (c->st != ST_DEAD)
            buf_consume(&c->ws, hl + len);
    }
}

/* One complete HTTP/2 frame from the server. */
static void on_h2_frame(ws_conn_t *c, const unsigned char *f, size_t len)
{
    int type = f[3], flags = f[4];
    uint32_t stream =
        ((uint32_t)f[5] << 24 | (uint32_t)f[6] << 16 | f[7] << 8 | f[8]) & 0x7fffffffu;
    const unsigned char *p = f + 9;
    if (type == 4 && !(flags & 1)) { /* SETTINGS */
        for (size_t i = 0; i + 6 <= len; i += 6)
            if ((p[i] << 8 | p[i + 1]) == 8)
                c->ecp = p[i + 5] == 1;
        h2_frame_head(&c->out, 0, 4, 1, 0);
        if (c->st == ST_H2_SETTINGS) {
            if (!c->ecp) {
                conn_fail(c, WHY_NO_ECP);
                return;
            }
            send_request(c);
            c->st = ST_HEAD;
        }
    } else if (type == 6 && !(flags & 1) && len == 8) { /* PING */
        h2_frame_head(&c->out, 8, 6, 1, 0);
        buf_append(&c->out, p, 8);
    } else if (type == 3 && stream == 1) {
        conn_fail(c, WHY_RST);
    } else if (type == 1 && stream == 1 && c->st == ST_HEAD) { /* HEADERS: :status */
        size_t off = 0, pad = 0;
        if (flags & 0x8)
            pad = len > 0 ? p[0] : 0, off = 1;
        if (flags & 0x20)
            off += 5;
        if (off + pad >= len || p[off] != 0x88) {
            fprintf(stderr, "ws_hold: h2 response head, not :status 200:");
            for (size_t i = off; i < len - pad && i < off + 8; i++)
                fprintf(stderr, " %02x", p[i]);
            fprintf(stderr, "\n");
            conn_fail(c, WHY_STATUS);
            return;
        }
        c->st = ST_EIO_OPEN;
        if (flags & 1)
            conn_fail(c, WHY_CLOSED);
    } else if (type == 0 && stream == 1) { /* DATA */
        size_t off = 0, pad = 0;
        if ((flags & 0x8) && len > 0)
            pad = p[0], off = 1;
        c->dwin += (uint32_t)len;
        if (off + pad <= len)
            buf_append(&c->ws, p + off, len - off - pad);
        on_ws_bytes(c);
        if (c->st != ST_DEAD && (flags & 1))
            conn_fail(c, WHY_CLOSED);
    }
}

static void on_bytes(ws_conn_t *c, const unsigned char *p, size_t n)
{
    if (!c->h2) {
        buf_append(&c->ws, p, n);
        on_ws_bytes(c);
        return;
    }
    buf_append(&c->in, p, n);
    while (c->st != ST_DEAD && c->in.len >= 9) {
        size_t len = (size_t)c->in.p[0] << 16 | (size_t)c->in.p[1] << 8 | c->in.p[2];
        if (len > 16384) {
            conn_fail(c, WHY_PROTOCOL);
            return;
        }
        if (c->in.len < 9 + len)
            break;
        on_h2_frame(c, c->in.p, len);
        if (c->st != ST_DEAD)
            buf_consume(&c->in, 9 + len);
    }
    if (c->st != ST_DEAD && c->dwin > 0) {
        /* Give back what the server sent at once, on the connection and the stream. */
        unsigned char inc[4] = {(unsigned char)(c->dwin >> 24), (unsigned char)(c->dwin >> 16),
                                (unsigned char)(c->dwin >> 8), (unsigned char)c->dwin};
        h2_frame_head(&c->out, 4, 8, 0, 0);
        buf_append(&c->out, inc, 4);
        h2_frame_head(&c->out, 4, 8, 0, 1);
        buf_append(&c->out, inc, 4);
        c->dwin = 0;
    }
}

static void on_event(ws_conn_t *c)
{
    if (c->st == ST_TLS) {
        int r = SSL_do_handshake(c->ssl);
        if (r != 1) {
            int e = SSL_get_error(c->ssl, r);
            ERR_clear_error();
            if (e == SSL_ERROR_WANT_READ)
                set_events(c, EPOLLIN);
            else if (e == SSL_ERROR_WANT_WRITE)
                set_events(c, EPOLLOUT);
            else
                conn_fail(c, WHY_TLS);
            return;
        }
        if (c->h2) {
            const unsigned char *proto;
            unsigned plen;
            SSL_get0_alpn_selected(c->ssl, &proto, &plen);
            if (plen != 2 || memcmp(proto, "h2", 2) != 0) {
                conn_fail(c, WHY_NO_H2);
                return;
            }
            static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
            buf_append(&c->out, preface, sizeof preface - 1);
            h2_frame_head(&c->out, 0, 4, 0, 0); /* empty SETTINGS */
            c->st = ST_H2_SETTINGS;
        } else {
            send_request(c);
            c->st = ST_HEAD;
        }
    }
    /* Read until the socket is drained; bounded since a reader that never drains is a flood. */
    for (int i = 0; c->st != ST_DEAD; i++) {
        if (i == 4096) {
            conn_fail(c, WHY_PROTOCOL);
            return;
        }
        int r = SSL_read(c->ssl, rbuf, sizeof rbuf);
        if (r > 0) {
            on_bytes(c, rbuf, (size_t)r);
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        ERR_clear_error();
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            conn_fail(c, WHY_CLOSED);
            return;
        }
        break;
    }
    if (c->st != ST_DEAD)
        flush(c);
}

static int start_one(SSL_CTX *ctx, int port, ws_conn_t *c, int h2)
{
    memset(c, 0, sizeof *c);
    c->h2 = (unsigned char)h2;
    c->st = ST_TLS;
    int fd;
    SSL *ssl = bench_tls_start(ctx, port, &fd);
    if (ssl == NULL)
        return -1;
    if (h2)
        SSL_set_alpn_protos(ssl, alpn_h2, sizeof alpn_h2 - 1);
    else
        SSL_set_alpn_protos(ssl, alpn_h1, sizeof alpn_h1 - 1);
    c->fd = fd;
    c->ssl = ssl;
    c->events = EPOLLOUT | EPOLLIN;
    struct epoll_event ev = {.events = c->events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void print_why(const unsigned *why)
{
    printf("{");
    for (int i = 0, first = 1; i < WHY_N; i++)
        if (why[i]) {
            printf("%s\"%s\":%u", first ? "" : ",", why_names[i], why[i]);
            first = 0;
        }
    printf("}");
}

/* Connections open but not pinged for more than 2 x pingInterval are lost. */
static void check_silent(ws_conn_t *conns, int n)
{
    int64_t t = now_ms();
    for (int i = 0; i < n; i++)
        if (conns[i].st == ST_OPEN && t - conns[i].last_ping_ms > 2 * conns[i].ping_interval_ms)
            conn_fail(&conns[i], WHY_SILENT);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: ws_hold PORT N CONCURRENCY mixed|h1|h2 [OPEN_DEADLINE_S]\n");
        return 2;
    }
    int port = atoi(argv[1]), n = atoi(argv[2]), conc = atoi(argv[3]);
    const char *mode = argv[4];
    int deadline_s = argc > 5 ? atoi(argv[5]) : 120;
    if (n <= 0 || conc <= 0 || (strcmp(mode, "mixed") && strcmp(mode, "h1") && strcmp(mode, "h2")))
        return 2;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    ws_conn_t *conns = calloc((size_t)n, sizeof *conns);
    if (!conns)
        return 1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    int started = 0;
    int64_t t0 = now_ms(), last_check = t0, deadline = t0 + (int64_t)deadline_s * 1000;
    struct epoll_event evs[256];
    while (opened + failed < n && now_ms() < deadline) {
        while (inflight < conc && started < n) {
            int h2 = strcmp(mode, "h2") == 0 || (strcmp(mode, "mixed") == 0 && started % 2);
            if (start_one(ctx, port, &conns[started], h2) == 0) {
                inflight++;
            } else {
                conns[started].st = ST_DEAD;
                why_open[WHY_CONNECT]++;
                failed++;
            }
            started++;
        }
        int k = epoll_wait(ep, evs, 256, 1000);
        for (int i = 0; i < k; i++)
            on_event(evs[i].data.ptr);
        if (now_ms() - last_check >= 1000) {
            check_silent(conns, started);
            last_check = now_ms();
        }
    }
    for (int i = 0; i < n; i++) {
        if (i >= started) {
            conns[i].st = ST_DEAD;
            why_open[WHY_DEADLINE]++;
            failed++;
        } else if (conns[i].st != ST_OPEN && conns[i].st != ST_DEAD) {
            conn_fail(&conns[i], WHY_DEADLINE);
        }
    }
    int nh1 = 0, nh2 = 0;
    for (int i = 0; i < n; i++)
        if (conns[i].st == ST_OPEN) {
            conns[i].held = 1;
            conns[i].h2 ? nh2++ : nh1++;
        }
    printf("{\"open\":%d,\"failed\":%d,\"h1\":%d,\"h2\":%d,\"open_s\":%.1f,\"why\":", opened,
           n - opened, nh1, nh2, (now_ms() - t0) / 1000.0);
    print_why(why_open);
    printf("}\n");
    fflush(stdout);

    /* The hold: until stdin has a line or ends. */
    holding = 1;
    int held_at_start = opened;
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = NULL};
    int stdin_polled = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev) == 0;
    for (int done = 0; !done;) {
        int k = epoll_wait(ep, evs, 256, 1000);
        for (int i = 0; i < k; i++) {
            if (evs[i].data.ptr == NULL) {
                char line[64];
                ssize_t r = read(0, line, sizeof line);
                if (r <= 0 || memchr(line, '\n', (size_t)r))
                    done = 1;
            } else {
                on_event(evs[i].data.ptr);
            }
        }
        if (!stdin_polled) { /* stdin is a file or /dev/null: no hold */
            done = 1;
        }
        if (now_ms() - last_check >= 1000) {
            check_silent(conns, n);
            last_check = now_ms();
        }
    }
    check_silent(conns, n);
    int held = 0;
    unsigned pongs = 0, min_pongs = 0;
    for (int i = 0; i < n; i++)
        if (conns[i].st == ST_OPEN && conns[i].held) {
            pongs += conns[i].pongs_hold;
            min_pongs =
                held == 0 || conns[i].pongs_hold < min_pongs ? conns[i].pongs_hold : min_pongs;
            held++;
        }
    printf("{\"held\":%d,\"of\":%d,\"lost\":%d,\"pongs\":%u,\"min_pongs\":%u,\"why\":", held,
           held_at_start, lost, pongs, min_pongs);
    print_why(why_hold);
    printf("}\n");
    fflush(stdout);
    /* Exit closes every socket. */
    return 0;
}
