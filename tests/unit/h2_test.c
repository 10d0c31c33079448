/* Unit tests for the sans-I/O HTTP/2 session (http2/session.c), driven in memory by an
 * nghttp2 client session. */
#include "moat/h2.h"
#include "test.h"

#include <nghttp2/nghttp2.h>
#include <stdlib.h>

/* ---- the server side's view ---- */

typedef struct {
    int requests, ends, closes, datas;
    int32_t last_id;
    uint32_t last_close_code;
    char method[32], path[64], authority[64], protocol[32], cookie[128], upper[8];
    int64_t content_length;
    int end_stream;
    size_t nheaders, body;
    int hold; /* do not consume request bytes */
    moat_h2_t *h;
} srv_t;

static void *on_request(void *ud, int32_t id, const moat_h2_request_t *r)
{
    srv_t *s = ud;
    s->requests++;
    s->last_id = id;
    snprintf(s->method, sizeof s->method, "%.*s", (int)r->method.len, r->method.base);
    snprintf(s->path, sizeof s->path, "%.*s", (int)r->path.len, r->path.base);
    snprintf(s->authority, sizeof s->authority, "%.*s", (int)r->authority.len, r->authority.base);
    snprintf(s->protocol, sizeof s->protocol, "%.*s", (int)r->protocol.len, r->protocol.base);
    s->cookie[0] = 0;
    for (size_t i = 0; i < r->nheaders; i++)
        if (moat_slice_eq(r->headers[i].name, "cookie"))
            snprintf(s->cookie, sizeof s->cookie, "%.*s", (int)r->headers[i].value.len,
                     r->headers[i].value.base);
    s->nheaders = r->nheaders;
    s->content_length = r->content_length;
    s->end_stream = r->end_stream;
    return s;
}

static void on_data(void *ud, void *st, int32_t id, moat_slice_t d)
{
    srv_t *s = ud;
    (void)st;
    s->datas++;
    s->body += d.len;
    if (!s->hold)
        moat_h2_consume(s->h, id, d.len);
}

static void on_end(void *ud, void *st, int32_t id)
{
    (void)st, (void)id;
    ((srv_t *)ud)->ends++;
}

static void on_close(void *ud, void *st, int32_t id, uint32_t code)
{
    srv_t *s = ud;
    (void)st, (void)id;
    s->closes++;
    s->last_close_code = code;
}

static const moat_h2_cb_t srv_cb = {on_request, on_data, on_end, on_close};

/* ---- the client ---- */

typedef struct {
    nghttp2_session *s;
    int goaway, rst;
    uint32_t goaway_code, rst_code;
    int status, connect_protocol;
    size_t body;
    int end;
    char hdr_names[512];
    const uint8_t *upload;
    size_t upload_left;
    uint8_t expect; /* when set: every body byte and x-big value byte should be this one */
    size_t wrong;   /* bytes that were not */
} cli_t;

static int c_on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    cli_t *c = ud;
    if (f->hd.type == NGHTTP2_GOAWAY) {
        c->goaway++;
        c->goaway_code = f->goaway.error_code;
    } else if (f->hd.type == NGHTTP2_RST_STREAM) {
        c->rst++;
        c->rst_code = f->rst_stream.error_code;
    } else if (f->hd.type == NGHTTP2_SETTINGS && !(f->hd.flags & NGHTTP2_FLAG_ACK)) {
        c->connect_protocol =
            (int)nghttp2_session_get_remote_settings(s, NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL);
    }
    if ((f->hd.type == NGHTTP2_DATA || f->hd.type == NGHTTP2_HEADERS) &&
        (f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        c->end++;
    return 0;
}

static int c_on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *n, size_t nl,
                       const uint8_t *v, size_t vl, uint8_t flags, void *ud)
{
    cli_t *c = ud;
    (void)s, (void)f, (void)flags;
    if (nl == 7 && memcmp(n, ":status", 7) == 0)
        c->status = atoi((const char *)v) ? (int)strtol((const char *)v, NULL, 10) : 0;
    else if (strlen(c->hdr_names) + nl + 2 < sizeof c->hdr_names)
        strncat(strncat(c->hdr_names, (const char *)n, nl), " ", 2);
    if (c->expect && nl == 5 && memcmp(n, "x-big", 5) == 0)
        for (size_t i = 0; i < vl; i++)
            c->wrong += v[i] != c->expect;
    return 0;
}

static int c_on_data(nghttp2_session *s, uint8_t fl, int32_t id, const uint8_t *d, size_t len,
                     void *ud)
{
    cli_t *c = ud;
    (void)s, (void)fl, (void)id;
    c->body += len;
    if (c->expect)
        for (size_t i = 0; i < len; i++)
            c->wrong += d[i] != c->expect;
    return 0;
}

static ssize_t c_read_upload(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len,
                             uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    cli_t *c = ud;
    (void)s, (void)id, (void)src;
    size_t n = MOAT_MIN(len, c->upload_left);
    memset(buf, 'u', n);
    c->upload_left -= n;
    if (c->upload_left == 0)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static void cli_init(cli_t *c)
{
    memset(c, 0, sizeof *c);
    nghttp2_option *opt;
    nghttp2_option_new(&opt);
    /* Let the client send header blocks larger than the server accepts. */
    nghttp2_option_set_max_send_header_block_length(opt, 1 << 20);
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, c_on_frame_recv);
    nghttp2_session_callbacks_set_on_header_callback(cb, c_on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, c_on_data);
    nghttp2_session_client_new2(&c->s, cb, c, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, NULL, 0);
}

/* Move bytes both ways until neither side has anything to say. Returns the last server
 * receive result (negative when the server ended the connection). */
static ssize_t pump(cli_t *c, moat_h2_t *h, int server_writes)
{
    ssize_t last = 0;
    for (int i = 0; i < 10000; i++) {
        int moved = 0;
        const uint8_t *p;
        ssize_t n;
        while ((n = nghttp2_session_mem_send(c->s, &p)) > 0) {
            moved = 1;
            last = moat_h2_recv(h, p, (size_t)n, 1000 + (uint64_t)i);
            if (last < 0)
                return last;
        }
        if (server_writes) {
            moat_slice_t out;
            while (moat_h2_send(h, &out) == 0 && out.len > 0) {
                moved = 1;
                nghttp2_session_mem_recv(c->s, (const uint8_t *)out.base, out.len);
            }
        }
        if (!moved)
            break;
    }
    return last;
}

/* Frames the server wrote, parsed from its raw output (for requests the client library would
 * refuse to send, answered on streams it does not know). */
typedef struct {
    int rst, goaway;
    uint32_t rst_code, goaway_code;
} seen_t;

static void drain_raw(moat_h2_t *h, seen_t *seen)
{
    moat_slice_t out;
    static uint8_t acc[1 << 16];
    size_t n = 0;
    while (moat_h2_send(h, &out) == 0 && out.len > 0 && n + out.len <= sizeof acc) {
        memcpy(acc + n, out.base, out.len);
        n += out.len;
    }
    for (size_t o = 0; o + 9 <= n;) {
        size_t len = (size_t)acc[o] << 16 | (size_t)acc[o + 1] << 8 | acc[o + 2];
        uint8_t type = acc[o + 3];
        const uint8_t *p = acc + o + 9;
        if (type == NGHTTP2_RST_STREAM) {
            seen->rst++;
            seen->rst_code = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | p[2] << 8 | p[3];
        } else if (type == NGHTTP2_GOAWAY) {
            seen->goaway++;
            seen->goaway_code = (uint32_t)p[4] << 24 | (uint32_t)p[5] << 16 | p[6] << 8 | p[7];
        }
        o += 9 + len;
    }
}

/* A HEADERS frame (END_STREAM|END_HEADERS) with fields encoded as given, byte for byte. */
static void send_raw_headers(moat_h2_t *h, int32_t id, const nghttp2_nv *nv, size_t n)
{
    nghttp2_hd_deflater *d;
    nghttp2_hd_deflate_new(&d, 4096);
    uint8_t buf[4096 + 9];
    ssize_t len = nghttp2_hd_deflate_hd(d, buf + 9, sizeof buf - 9, nv, n);
    nghttp2_hd_deflate_del(d);
    buf[0] = 0, buf[1] = (uint8_t)(len >> 8), buf[2] = (uint8_t)len;
    buf[3] = NGHTTP2_HEADERS, buf[4] = NGHTTP2_FLAG_END_STREAM | NGHTTP2_FLAG_END_HEADERS;
    buf[5] = 0, buf[6] = 0, buf[7] = 0, buf[8] = (uint8_t)id;
    moat_h2_recv(h, buf, (size_t)len + 9, 5000);
}

/* Any frame, byte for byte. */
static void send_raw_frame(moat_h2_t *h, uint8_t type, uint8_t flags, int32_t id,
                           const void *payload, size_t len)
{
    uint8_t buf[9 + 256];
    if (len > sizeof buf - 9)
        return;
    buf[0] = 0, buf[1] = (uint8_t)(len >> 8), buf[2] = (uint8_t)len, buf[3] = type;
    buf[4] = flags, buf[5] = (uint8_t)(id >> 24), buf[6] = (uint8_t)(id >> 16);
    buf[7] = (uint8_t)(id >> 8), buf[8] = (uint8_t)id;
    if (len)
        memcpy(buf + 9, payload, len);
    moat_h2_recv(h, buf, 9 + len, 5000);
}

/* A HEADERS frame with these flags (END_HEADERS always) and fields encoded as given. */
static void send_raw_headers_flags(moat_h2_t *h, int32_t id, uint8_t flags, const nghttp2_nv *nv,
                                   size_t n)
{
    nghttp2_hd_deflater *d;
    nghttp2_hd_deflate_new(&d, 4096);
    uint8_t buf[256];
    ssize_t len = nghttp2_hd_deflate_hd(d, buf, sizeof buf, nv, n);
    nghttp2_hd_deflate_del(d);
    if (len > 0)
        send_raw_frame(h, NGHTTP2_HEADERS, flags | NGHTTP2_FLAG_END_HEADERS, id, buf, (size_t)len);
}

#define NV(n, v)                                                                                   \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, 0                            \
    }

static void setup(srv_t *s, cli_t *c, int connect_protocol)
{
    memset(s, 0, sizeof *s);
    moat_h2_settings_t set = {.enable_connect_protocol = connect_protocol};
    s->h = moat_h2_new(&set, &srv_cb, s);
    cli_init(c);
    pump(c, s->h, 1);
}

static void teardown(srv_t *s, cli_t *c)
{
    moat_h2_free(s->h);
    nghttp2_session_del(c->s);
}

static void test_request_response(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    CHECK_INT(c.connect_protocol, 0);
    nghttp2_nv nv[] = {NV(":method", "GET"),  NV(":scheme", "https"), NV(":authority", "a.test"),
                       NV(":path", "/x?y=1"), NV("cookie", "a=1"),    NV("accept", "*/*"),
                       NV("cookie", "b=2"),   NV("cookie", "c=3")};
    int32_t id = nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 1);
    CHECK_STR(s.method, "GET");
    CHECK_STR(s.path, "/x?y=1");
    CHECK_STR(s.authority, "a.test");
    CHECK_STR(s.cookie, "a=1; b=2; c=3"); /* RFC 9113 §8.2.3 */
    CHECK_INT(s.nheaders, 2);             /* one cookie field + accept */
    CHECK_INT(s.end_stream, 1);
    CHECK_INT(s.content_length, -1);
    CHECK_INT(moat_h2_open_streams(s.h), 1);
    moat_header_t rh[] = {{MOAT_SLICE_LIT("Content-Type"), MOAT_SLICE_LIT("text/plain")},
                          {MOAT_SLICE_LIT("Connection"), MOAT_SLICE_LIT("close")},
                          {MOAT_SLICE_LIT("X-Mixed-Case"), MOAT_SLICE_LIT("v")}};
    CHECK_INT(moat_h2_respond(s.h, id, 200, rh, 3, -1, 1), 0);
    pump(&c, s.h, 1);
    CHECK_INT(c.status, 200);
    CHECK_STR(c.hdr_names, "content-type x-mixed-case ");
    CHECK_INT(c.end, 0); /* body deferred until data arrives */
    CHECK_INT(moat_h2_send_data(s.h, id, MOAT_SLICE_LIT("hello ")), 0);
    CHECK_INT(moat_h2_stream_queued(s.h, id), 6);
    pump(&c, s.h, 1);
    CHECK_INT(c.body, 6);
    CHECK_INT(moat_h2_stream_queued(s.h, id), 0);
    CHECK_INT(moat_h2_send_data(s.h, id, MOAT_SLICE_LIT("world")), 0);
    CHECK_INT(moat_h2_send_end(s.h, id), 0);
    pump(&c, s.h, 1);
    CHECK_INT(c.body, 11);
    CHECK_INT(c.end, 1);
    CHECK_INT(s.closes, 1);
    CHECK_INT(s.last_close_code, 0);
    CHECK_INT(moat_h2_open_streams(s.h), 0);
    CHECK(moat_h2_send_data(s.h, id, MOAT_SLICE_LIT("x")) == MOAT_ECLOSED);
    teardown(&s, &c);
}

static void test_flow_control_backpressure(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    s.hold = 1;
    /* Give the client a big connection window so only the stream window can stop it. */
    nghttp2_nv nv[] = {NV(":method", "POST"), NV(":scheme", "https"), NV(":authority", "a"),
                       NV(":path", "/up")};
    c.upload_left = 1024 * 1024;
    nghttp2_data_provider prd = {.read_callback = c_read_upload};
    int32_t id = nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), &prd, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 1);
    CHECK_INT(s.end_stream, 0);
    /* Nothing consumed: the client stops at the stream window. */
    CHECK_INT(s.body, MOAT_H2_STREAM_WINDOW);
    CHECK_INT(nghttp2_session_get_stream_remote_window_size(c.s, id), 0);
    moat_h2_consume(s.h, id, s.body);
    pump(&c, s.h, 1);
    CHECK_INT(s.body, 2 * MOAT_H2_STREAM_WINDOW);
    s.hold = 0;
    moat_h2_consume(s.h, id, MOAT_H2_STREAM_WINDOW);
    pump(&c, s.h, 1);
    CHECK_INT(s.body, 1024 * 1024);
    CHECK_INT(s.ends, 1);
    teardown(&s, &c);
}

static void test_invalid_headers_rejected(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    /* NO_INDEX: the encoder's table stays empty, so each block decodes on its own. */
#define NVR(n, v)                                                                                  \
    {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, NGHTTP2_NV_FLAG_NO_INDEX}
    nghttp2_nv upper[] = {NVR(":method", "GET"), NVR(":scheme", "https"), NVR(":authority", "a"),
                          NVR(":path", "/"), NVR("X-Upper", "1")};
    send_raw_headers(s.h, 1, upper, MOAT_ARRAY_LEN(upper));
    drain_raw(s.h, &seen);
    CHECK_INT(s.requests, 0);
    CHECK_INT(seen.rst, 1);
    CHECK_INT(seen.rst_code, NGHTTP2_PROTOCOL_ERROR);
    nghttp2_nv conn[] = {NVR(":method", "GET"), NVR(":scheme", "https"), NVR(":authority", "a"),
                         NVR(":path", "/"), NVR("connection", "keep-alive")};
    send_raw_headers(s.h, 3, conn, MOAT_ARRAY_LEN(conn));
    drain_raw(s.h, &seen);
    CHECK_INT(s.requests, 0);
    CHECK_INT(seen.rst, 2);
    nghttp2_nv te[] = {NVR(":method", "GET"), NVR(":scheme", "https"), NVR(":authority", "a"),
                       NVR(":path", "/"), NVR("te", "gzip")};
    send_raw_headers(s.h, 5, te, MOAT_ARRAY_LEN(te));
    drain_raw(s.h, &seen);
    CHECK_INT(s.requests, 0);
    CHECK_INT(seen.rst, 3);
    nghttp2_nv nopath[] = {NVR(":method", "GET"), NVR(":scheme", "https"), NVR(":authority", "a")};
    send_raw_headers(s.h, 7, nopath, MOAT_ARRAY_LEN(nopath));
    drain_raw(s.h, &seen);
    CHECK_INT(s.requests, 0);
    CHECK_INT(seen.rst, 4);
    nghttp2_nv ok[] = {NVR(":method", "GET"), NVR(":scheme", "https"), NVR(":authority", "a"),
                       NVR(":path", "/"), NVR("te", "trailers")};
    send_raw_headers(s.h, 9, ok, MOAT_ARRAY_LEN(ok));
    drain_raw(s.h, &seen);
    CHECK_INT(s.requests, 1);
    CHECK_INT(seen.goaway, 0);
    teardown(&s, &c);
}

static void test_content_length_mismatch(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    nghttp2_nv nv[] = {NV(":method", "POST"), NV(":scheme", "https"), NV(":authority", "a"),
                       NV(":path", "/"), NV("content-length", "10")};
    c.upload_left = 4;
    nghttp2_data_provider prd = {.read_callback = c_read_upload};
    nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), &prd, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 1);
    CHECK_INT(s.content_length, 10);
    CHECK_INT(s.ends, 0); /* never a whole body */
    CHECK_INT(s.closes, 1);
    CHECK_INT(s.last_close_code, NGHTTP2_PROTOCOL_ERROR);
    teardown(&s, &c);
}

static void test_extended_connect(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 1);
    CHECK_INT(c.connect_protocol, 1);
    nghttp2_nv nv[] = {NV(":method", "CONNECT"), NV(":protocol", "websocket"),
                       NV(":scheme", "https"),   NV(":authority", "a"),
                       NV(":path", "/ws"),       NV("sec-websocket-version", "13")};
    nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 1);
    CHECK_STR(s.method, "CONNECT");
    CHECK_STR(s.protocol, "websocket");
    CHECK_STR(s.path, "/ws");
    teardown(&s, &c);
}

static void test_rapid_reset(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    nghttp2_nv nv[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a"),
                       NV(":path", "/")};
    for (int i = 0; i < 2000 && c.goaway == 0; i++) {
        int32_t id = nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
        pump(&c, s.h, 1);
        nghttp2_submit_rst_stream(c.s, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
        pump(&c, s.h, 1);
    }
    CHECK_INT(c.goaway, 1);
    CHECK_INT(c.goaway_code, NGHTTP2_ENHANCE_YOUR_CALM);
    CHECK(s.requests < 1000);
    CHECK(!moat_h2_want_read(s.h));
    CHECK_INT(moat_h2_open_streams(s.h), 0);
    teardown(&s, &c);
}

static void test_header_list_limit(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    static char big[8000];
    memset(big, 'b', sizeof big);
    nghttp2_nv nv[13] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a"),
                         NV(":path", "/")};
    for (int i = 4; i < 13; i++) /* 9 x 8000 bytes + overhead > 64 KiB */
        nv[i] = (nghttp2_nv){(uint8_t *)"x-big", (uint8_t *)big, 5, sizeof big,
                             NGHTTP2_NV_FLAG_NO_INDEX};
    nghttp2_submit_request(c.s, NULL, nv, 13, NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 0);
    CHECK_INT(c.rst, 1);
    CHECK_INT(c.goaway, 0); /* one oversized list costs a stream, not the connection */
    teardown(&s, &c);
}

static void test_settings_flood_unread(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    /* A client that never reads: each PING asks for an ACK the server cannot deliver. */
    ssize_t r = 0;
    for (int i = 0; i < 5000 && r >= 0; i++) {
        nghttp2_submit_ping(c.s, NGHTTP2_FLAG_NONE, NULL);
        r = pump(&c, s.h, 0);
    }
    /* Either nghttp2's outbound ACK cap (NGHTTP2_ERR_FLOODED) or moat's control-frame
     * budget ends it, whichever comes first. */
    CHECK(r < 0 || moat_h2_why(s.h)[0] != 0);
    teardown(&s, &c);
}

static void test_ping_flood_read(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    for (int i = 0; i < 5000 && c.goaway == 0; i++) {
        nghttp2_submit_ping(c.s, NGHTTP2_FLAG_NONE, NULL);
        pump(&c, s.h, 1); /* all within ~5 "seconds" of the fake clock */
    }
    CHECK_INT(c.goaway, 1);
    CHECK_INT(c.goaway_code, NGHTTP2_ENHANCE_YOUR_CALM);
    teardown(&s, &c);
}

static void test_goaway_graceful(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    nghttp2_nv nv[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a"),
                       NV(":path", "/")};
    int32_t id = nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(&c, s.h, 1);
    moat_h2_goaway(s.h);
    moat_h2_goaway(s.h); /* idempotent */
    pump(&c, s.h, 1);
    CHECK_INT(c.goaway, 1);
    CHECK_INT(c.goaway_code, NGHTTP2_NO_ERROR);
    CHECK_INT(moat_h2_open_streams(s.h), 1);
    /* A stream opened after the GOAWAY is not taken. */
    nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(s.requests, 1);
    /* The stream in flight completes. */
    CHECK_INT(moat_h2_respond(s.h, id, 204, NULL, 0, -1, 0), 0);
    pump(&c, s.h, 1);
    CHECK_INT(c.status, 204);
    CHECK_INT(moat_h2_open_streams(s.h), 0);
    CHECK(!moat_h2_want_read(s.h) || !moat_h2_want_write(s.h));
    teardown(&s, &c);
}

static void test_bad_preface(void)
{
    srv_t s;
    memset(&s, 0, sizeof s);
    moat_h2_settings_t set = {0};
    s.h = moat_h2_new(&set, &srv_cb, &s);
    const char junk[] = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    CHECK(moat_h2_recv(s.h, junk, sizeof junk - 1, 1) < 0);
    moat_h2_free(s.h);
}

/* ---- stream states (RFC 9113 §5.1): frames on streams the server has already closed ---- */

static const nghttp2_nv get_nv[] = {NVR(":method", "GET"), NVR(":scheme", "https"),
                                    NVR(":authority", "a"), NVR(":path", "/")};

/* A request on stream id that the server answers (204, no body) and so closes. */
static void served(srv_t *s, int32_t id, uint8_t flags)
{
    seen_t seen = {0};
    send_raw_headers_flags(s->h, id, flags, get_nv, MOAT_ARRAY_LEN(get_nv));
    CHECK_INT(moat_h2_respond(s->h, id, 204, NULL, 0, -1, 0), 0);
    drain_raw(s->h, &seen);
    CHECK_INT(seen.goaway, 0);
    CHECK_INT(moat_h2_open_streams(s->h), 0);
}

static void test_frames_after_end_stream(void)
{
    /* "closed": any frame after the client's END_STREAM is a connection error STREAM_CLOSED,
     * even once the response has closed the stream and nghttp2 has forgotten it. */
    for (int kind = 0; kind < 2; kind++) {
        srv_t s;
        cli_t c;
        setup(&s, &c, 0);
        served(&s, 1, NGHTTP2_FLAG_END_STREAM);
        if (kind == 0)
            send_raw_frame(s.h, NGHTTP2_DATA, NGHTTP2_FLAG_END_STREAM, 1, "late", 4);
        else
            send_raw_headers_flags(s.h, 1, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
        seen_t seen = {0};
        drain_raw(s.h, &seen);
        CHECK_INT(seen.goaway, 1);
        CHECK_INT(seen.goaway_code, NGHTTP2_STREAM_CLOSED);
        CHECK_INT(s.requests, 1);
        teardown(&s, &c);
    }
}

static void test_frames_after_client_reset(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    send_raw_headers_flags(s.h, 1, 0, get_nv, MOAT_ARRAY_LEN(get_nv));
    uint8_t cancel[4] = {0, 0, 0, NGHTTP2_CANCEL};
    send_raw_frame(s.h, NGHTTP2_RST_STREAM, 0, 1, cancel, 4);
    CHECK_INT(s.closes, 1);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.rst, 0); /* never a reset in answer to a reset */
    /* After the client's RST_STREAM: a stream error STREAM_CLOSED, for DATA and HEADERS. */
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 1, "late", 4);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.rst, 1);
    CHECK_INT(seen.rst_code, NGHTTP2_STREAM_CLOSED);
    send_raw_headers_flags(s.h, 1, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    drain_raw(s.h, &seen);
    CHECK_INT(seen.rst, 2);
    CHECK_INT(seen.rst_code, NGHTTP2_STREAM_CLOSED);
    CHECK_INT(seen.goaway, 0);
    /* The connection goes on. */
    send_raw_headers_flags(s.h, 3, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    CHECK_INT(s.requests, 2);
    teardown(&s, &c);
}

static void test_frames_after_server_close_ignored(void)
{
    /* The server ended or reset the stream while the client could still send: frames already
     * in flight are ignored (RFC 9113 §5.1), trailers included. */
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    served(&s, 1, 0); /* the response ends it; the server resets with NO_ERROR */
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 1, "body", 4);
    send_raw_headers_flags(s.h, 1, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    send_raw_headers_flags(s.h, 3, 0, get_nv, MOAT_ARRAY_LEN(get_nv));
    moat_h2_reset(s.h, 3, NGHTTP2_CANCEL);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.rst, 1); /* the CANCEL only */
    send_raw_frame(s.h, NGHTTP2_DATA, NGHTTP2_FLAG_END_STREAM, 3, "body", 4);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.rst, 1);
    CHECK_INT(seen.goaway, 0);
    send_raw_headers_flags(s.h, 5, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    CHECK_INT(s.requests, 3);
    teardown(&s, &c);
}

static void test_lower_stream_id(void)
{
    /* §5.1.1: a HEADERS naming a lower id than one already used is a connection error
     * PROTOCOL_ERROR, whether or not the higher stream is still open. */
    for (int answered = 0; answered < 2; answered++) {
        srv_t s;
        cli_t c;
        setup(&s, &c, 0);
        seen_t seen = {0};
        if (answered)
            served(&s, 5, NGHTTP2_FLAG_END_STREAM);
        else
            send_raw_headers_flags(s.h, 5, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
        send_raw_headers_flags(s.h, 3, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
        drain_raw(s.h, &seen);
        CHECK_INT(seen.goaway, 1);
        CHECK_INT(seen.goaway_code, NGHTTP2_PROTOCOL_ERROR);
        CHECK_INT(s.requests, 1);
        teardown(&s, &c);
    }
    /* DATA on an id skipped over: closed, STREAM_CLOSED. */
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    send_raw_headers_flags(s.h, 5, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 3, "x", 1);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 1);
    CHECK_INT(seen.goaway_code, NGHTTP2_STREAM_CLOSED);
    teardown(&s, &c);
}

static void test_closed_ids_remembered_in_a_window(void)
{
    /* Only the latest 128 client ids keep a record; older ones are ignored as nghttp2 does
     * (the memory stays fixed however long the connection lives). */
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    served(&s, 1, NGHTTP2_FLAG_END_STREAM);
    send_raw_headers_flags(s.h, 301, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 1, "x", 1);  /* ended, but forgotten */
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 45, "x", 1); /* skipped, 128 ids back: forgotten */
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 0);
    CHECK_INT(seen.rst, 0);
    send_raw_frame(s.h, NGHTTP2_DATA, 0, 47, "x", 1); /* skipped, 127 ids back */
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 1);
    CHECK_INT(seen.goaway_code, NGHTTP2_STREAM_CLOSED);
    teardown(&s, &c);
}

static void test_frame_header_split_across_reads(void)
{
    /* Frame headers cut anywhere still reach the judge whole. */
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    seen_t seen = {0};
    served(&s, 1, NGHTTP2_FLAG_END_STREAM);
    uint8_t f[9 + 4] = {0, 0, 4, NGHTTP2_DATA, 0, 0, 0, 0, 1, 'l', 'a', 't', 'e'};
    for (size_t i = 0; i < sizeof f; i++)
        moat_h2_recv(s.h, f + i, 1, 5000);
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 1);
    CHECK_INT(seen.goaway_code, NGHTTP2_STREAM_CLOSED);
    teardown(&s, &c);
}

/* The rules nghttp2 applies while the stream is still open (moat must keep them on: HTTP
 * messaging checks, no auto-ignoring). Each case: a request on stream 1 left unanswered, one
 * bad frame, the error expected (RST_STREAM on 1, or GOAWAY). */
static void test_rules_on_open_streams(void)
{
    static const nghttp2_nv trailer_pseudo[] = {NVR(":method", "GET")};
    static const uint8_t zero[4] = {0, 0, 0, 0}, huge[4] = {0x7f, 0xff, 0xff, 0xff};
    /* DATA, PADDED: pad length 6 in a 5-byte payload. */
    static const uint8_t badpad[5] = {6, 't', 'e', 's', 't'};
    struct {
        const char *name;
        int end_stream; /* the request HEADERS ends the stream */
        int goaway;     /* connection error, else stream error */
        uint32_t code;
    } cases[] = {
        {"half-closed (remote): DATA", 1, 1, NGHTTP2_STREAM_CLOSED},
        {"half-closed (remote): HEADERS", 1, 1, NGHTTP2_STREAM_CLOSED},
        {"second HEADERS without END_STREAM", 0, 0, NGHTTP2_PROTOCOL_ERROR},
        {"pseudo-header field in trailers", 0, 0, NGHTTP2_PROTOCOL_ERROR},
        /* nghttp2 ends the connection: §5.4.1 lets any stream error be one. */
        {"WINDOW_UPDATE of 0 on a stream", 0, 1, NGHTTP2_PROTOCOL_ERROR},
        {"stream window above 2^31-1", 0, 0, NGHTTP2_FLOW_CONTROL_ERROR},
        {"DATA padding longer than the payload", 0, 1, NGHTTP2_PROTOCOL_ERROR},
    };
    for (size_t i = 0; i < MOAT_ARRAY_LEN(cases); i++) {
        srv_t s;
        cli_t c;
        setup(&s, &c, 0);
        seen_t seen = {0};
        send_raw_headers_flags(s.h, 1, cases[i].end_stream ? NGHTTP2_FLAG_END_STREAM : 0, get_nv,
                               MOAT_ARRAY_LEN(get_nv));
        drain_raw(s.h, &seen);
        switch (i) {
        case 0: send_raw_frame(s.h, NGHTTP2_DATA, NGHTTP2_FLAG_END_STREAM, 1, "test", 4); break;
        case 1:
            send_raw_headers_flags(s.h, 1, NGHTTP2_FLAG_END_STREAM, get_nv, MOAT_ARRAY_LEN(get_nv));
            break;
        case 2:
            send_raw_frame(s.h, NGHTTP2_DATA, 0, 1, "test", 4);
            send_raw_headers_flags(s.h, 1, 0, get_nv, MOAT_ARRAY_LEN(get_nv));
            break;
        case 3:
            send_raw_frame(s.h, NGHTTP2_DATA, 0, 1, "test", 4);
            send_raw_headers_flags(s.h, 1, NGHTTP2_FLAG_END_STREAM, trailer_pseudo, 1);
            break;
        case 4: send_raw_frame(s.h, NGHTTP2_WINDOW_UPDATE, 0, 1, zero, 4); break;
        case 5:
            send_raw_frame(s.h, NGHTTP2_WINDOW_UPDATE, 0, 1, huge, 4);
            send_raw_frame(s.h, NGHTTP2_WINDOW_UPDATE, 0, 1, huge, 4);
            break;
        default:
            send_raw_frame(s.h, NGHTTP2_DATA, NGHTTP2_FLAG_PADDED | NGHTTP2_FLAG_END_STREAM, 1,
                           badpad, sizeof badpad);
            break;
        }
        drain_raw(s.h, &seen);
        if (seen.goaway != cases[i].goaway || seen.rst != !cases[i].goaway ||
            (cases[i].goaway ? seen.goaway_code : seen.rst_code) != cases[i].code)
            fprintf(stderr, "case: %s\n", cases[i].name);
        CHECK_INT(seen.goaway, cases[i].goaway);
        CHECK_INT(seen.rst, !cases[i].goaway);
        CHECK_INT(cases[i].goaway ? seen.goaway_code : seen.rst_code, cases[i].code);
        teardown(&s, &c);
    }
}

/* The sessions of a thread share nghttp2's frame buffer (session.c, "memory"): output of one
 * session must stay intact while another one's is produced in between, including header blocks
 * over 16 KiB (HEADERS + CONTINUATION spread over several mem_send calls) and DATA frames. */
static void test_shared_frame_buffer(void)
{
    srv_t s[2];
    cli_t c[2];
    int32_t id[2];
    static char big[2][3][9000];
    for (int k = 0; k < 2; k++) {
        setup(&s[k], &c[k], 0);
        c[k].expect = (uint8_t)(k ? 'b' : 'a');
        nghttp2_nv nv[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a.test"),
                           NV(":path", "/")};
        id[k] = nghttp2_submit_request(c[k].s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
        pump(&c[k], s[k].h, 0);
        CHECK_INT(s[k].requests, 1);
        moat_header_t rh[3];
        for (int j = 0; j < 3; j++) {
            memset(big[k][j], c[k].expect, sizeof big[k][j]);
            rh[j] = (moat_header_t){MOAT_SLICE_LIT("x-big"), moat_slice(big[k][j], 9000)};
        }
        CHECK_INT(moat_h2_respond(s[k].h, id[k], 200, rh, 3, -1, 1), 0);
        CHECK_INT(moat_h2_send_data(s[k].h, id[k], moat_slice(big[k][0], 9000)), 0);
        CHECK_INT(moat_h2_send_data(s[k].h, id[k], moat_slice(big[k][1], 9000)), 0);
        CHECK_INT(moat_h2_send_end(s[k].h, id[k]), 0);
    }
    /* One mem_send of each session in turn, each copied at once as moat's callers do; the
     * clients read only after both have produced, so what the first session hands out next
     * must not depend on what the second one wrote into the buffer meanwhile. */
    int done[2] = {0, 0};
    while (!done[0] || !done[1]) {
        uint8_t *copy[2] = {NULL, NULL};
        size_t len[2] = {0, 0};
        for (int k = 0; k < 2; k++) {
            moat_slice_t out;
            if (done[k] || moat_h2_send(s[k].h, &out) != 0 || out.len == 0) {
                done[k] = 1;
                continue;
            }
            copy[k] = malloc(out.len);
            memcpy(copy[k], out.base, out.len);
            len[k] = out.len;
        }
        for (int k = 0; k < 2; k++) {
            if (copy[k])
                nghttp2_session_mem_recv(c[k].s, copy[k], len[k]);
            free(copy[k]);
        }
    }
    for (int k = 0; k < 2; k++) {
        pump(&c[k], s[k].h, 1);
        CHECK_INT(c[k].status, 200);
        CHECK_STR(c[k].hdr_names, "x-big x-big x-big ");
        CHECK_INT(c[k].body, 18000);
        CHECK_INT(c[k].end, 1);
        CHECK_INT(c[k].wrong, 0);
    }
    for (int k = 0; k < 2; k++)
        teardown(&s[k], &c[k]);
}

/* ---- rest (session.c, "rest") ---- */

/* A GET on the client with these cookie and path values, answered with a 200 and a body of
 * body_len bytes of 'r'; returns the stream id. */
static int32_t get_and_answer(srv_t *s, cli_t *c, const char *path, size_t body_len)
{
    nghttp2_nv nv[] = {NV(":method", "GET"),
                       NV(":scheme", "https"),
                       NV(":authority", "a.test"),
                       {(uint8_t *)":path", (uint8_t *)path, 5, strlen(path), 0},
                       NV("cookie", "session=0123456789abcdef0123456789abcdef"),
                       NV("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/156")};
    int requests = s->requests;
    int32_t id = nghttp2_submit_request(c->s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(c, s->h, 1);
    CHECK_INT(s->requests, requests + 1);
    CHECK_STR(s->path, path);
    CHECK_STR(s->authority, "a.test");
    CHECK_STR(s->cookie, "session=0123456789abcdef0123456789abcdef");
    static char body[256 * 1024];
    memset(body, 'r', sizeof body);
    c->status = 0;
    CHECK_INT(moat_h2_respond(s->h, id, 200, NULL, 0, (int64_t)body_len, body_len > 0), 0);
    if (body_len) {
        CHECK_INT(moat_h2_send_data(s->h, id, moat_slice(body, MOAT_MIN(body_len, sizeof body))),
                  0);
        CHECK_INT(moat_h2_send_end(s->h, id), 0);
    }
    pump(c, s->h, 1);
    CHECK_INT(c->status, 200);
    return id;
}

/* A connection that only exchanged SETTINGS rests at once and serves the next request. */
static void test_rest_before_any_request(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 1);
    CHECK_INT(moat_h2_rest(s.h), 1);
    CHECK_INT(moat_h2_at_rest(s.h), 1);
    CHECK_INT(moat_h2_want_read(s.h), 1);
    CHECK_INT(moat_h2_want_write(s.h), 0);
    get_and_answer(&s, &c, "/one", 10);
    CHECK_INT(moat_h2_at_rest(s.h), 0);
    CHECK_INT(c.body, 10);
    CHECK_INT(c.goaway, 0);
    /* moat's SETTINGS are in force in the woken session: extended CONNECT is accepted. */
    nghttp2_nv ws[] = {NV(":method", "CONNECT"), NV(":protocol", "websocket"),
                       NV(":scheme", "https"), NV(":authority", "a.test"), NV(":path", "/ws")};
    nghttp2_submit_request(c.s, NULL, ws, MOAT_ARRAY_LEN(ws), NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_STR(s.protocol, "websocket");
    CHECK_INT(c.rst, 0);
    teardown(&s, &c);
}

/* After requests the client's HPACK table is emptied first (SETTINGS_HEADER_TABLE_SIZE 0);
 * the rest follows its ACK; the woken session decodes the next requests, including ones that
 * use the client's table again once 4,096 bytes are offered anew. */
static void test_rest_after_requests(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    /* A browser's connection window (Chrome's 15 MiB, say), so that 5-byte answers do not
     * leave the server's view of it below 65,535 until the client gives it back. */
    nghttp2_session_set_local_window_size(c.s, NGHTTP2_FLAG_NONE, 0, 1 << 20);
    get_and_answer(&s, &c, "/one", 0);
    get_and_answer(&s, &c, "/two", 0); /* indexes cookie and user-agent from the first */
    CHECK_INT(moat_h2_rest(s.h), 0);   /* the empty table goes out first */
    CHECK_INT(moat_h2_at_rest(s.h), 0);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_at_rest(s.h), 1);
    for (int i = 0; i < 3; i++) {
        get_and_answer(&s, &c, i == 1 ? "/four" : "/three", 5);
        CHECK_INT(c.goaway, 0);
    }
    /* Quiet again: empty again, and rest. */
    CHECK_INT(moat_h2_rest(s.h), 0);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_at_rest(s.h), 1);
    get_and_answer(&s, &c, "/five", 5);
    CHECK_INT(c.goaway, 0);
    CHECK_INT(c.rst, 0);
    teardown(&s, &c);
}

/* Frames still in flight for streams that ended before the rest stay harmless; a new HEADERS
 * on such a stream is still the connection error it was (RFC 9113 §5.1). */
static void test_rest_keeps_stream_ids(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    int32_t id = get_and_answer(&s, &c, "/one", 0);
    CHECK_INT(moat_h2_rest(s.h), 0);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_at_rest(s.h), 1);
    uint8_t wu[4] = {0, 0, 0x10, 0};
    send_raw_frame(s.h, NGHTTP2_WINDOW_UPDATE, 0, id, wu, 4);
    uint8_t rst[4] = {0, 0, 0, NGHTTP2_CANCEL};
    send_raw_frame(s.h, NGHTTP2_RST_STREAM, 0, id, rst, 4);
    seen_t seen = {0};
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 0);
    CHECK_INT(seen.rst, 0);
    CHECK_INT(s.requests, 1);
    nghttp2_nv nv[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a.test"),
                       NV(":path", "/again")};
    send_raw_headers(s.h, id, nv, MOAT_ARRAY_LEN(nv));
    drain_raw(s.h, &seen);
    CHECK_INT(seen.goaway, 1);
    CHECK_INT(seen.goaway_code, NGHTTP2_STREAM_CLOSED);
    CHECK_INT(s.requests, 1);
    teardown(&s, &c);
}

/* The client's settings and its connection window for us survive the rest: with a 1 MiB
 * stream window and connection window and no WINDOW_UPDATE after the rest, a 200 KiB answer
 * arrives whole. */
static void test_rest_keeps_windows(void)
{
    srv_t s;
    cli_t c;
    memset(&s, 0, sizeof s);
    moat_h2_settings_t set = {0};
    s.h = moat_h2_new(&set, &srv_cb, &s);
    cli_init(&c);
    nghttp2_settings_entry iv = {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20};
    nghttp2_submit_settings(c.s, NGHTTP2_FLAG_NONE, &iv, 1);
    nghttp2_session_set_local_window_size(c.s, NGHTTP2_FLAG_NONE, 0, 4 << 20);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_rest(s.h), 1);
    /* The client now stops giving window back. */
    nghttp2_session_set_local_window_size(c.s, NGHTTP2_FLAG_NONE, 0, 4 << 20);
    size_t before = c.body;
    int32_t id = get_and_answer(&s, &c, "/big", 200 * 1024);
    (void)id;
    CHECK_INT(c.body - before, 200 * 1024);
    CHECK_INT(c.end, 1);
    teardown(&s, &c);
}

/* No rest while anything is in flight: an open stream, a frame half read, a header block
 * waiting for CONTINUATION, SETTINGS not yet ACKed. GOAWAY from a rested connection wakes it. */
static void test_rest_only_when_quiet(void)
{
    srv_t s;
    cli_t c;
    setup(&s, &c, 0);
    nghttp2_nv nv[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":authority", "a.test"),
                       NV(":path", "/")};
    int32_t id = nghttp2_submit_request(c.s, NULL, nv, MOAT_ARRAY_LEN(nv), NULL, NULL);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_rest(s.h), 0); /* stream open */
    CHECK_INT(moat_h2_respond(s.h, id, 204, NULL, 0, -1, 0), 0);
    CHECK_INT(moat_h2_rest(s.h), 0); /* answer not sent */
    pump(&c, s.h, 1);
    uint8_t half[5] = {0, 0, 8, NGHTTP2_PING, 0};
    moat_h2_recv(s.h, half, sizeof half, 6000);
    CHECK_INT(moat_h2_rest(s.h), 0); /* a frame header half read */
    uint8_t rest_of_it[4 + 8] = {0};
    moat_h2_recv(s.h, rest_of_it, sizeof rest_of_it, 6000);
    CHECK_INT(moat_h2_rest(s.h), 0); /* the PING's ACK not sent */
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_at_rest(s.h), 0);
    CHECK_INT(moat_h2_rest(s.h), 0); /* quiet: the empty table goes, and the rest follows */
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_at_rest(s.h), 1);
    moat_h2_goaway(s.h);
    CHECK_INT(moat_h2_at_rest(s.h), 0);
    pump(&c, s.h, 1);
    CHECK_INT(c.goaway, 1);
    CHECK_INT(c.goaway_code, NGHTTP2_NO_ERROR);
    teardown(&s, &c);

    setup(&s, &c, 0);
    send_raw_frame(s.h, NGHTTP2_HEADERS, 0, 1, "\x82", 1); /* no END_HEADERS */
    CHECK_INT(moat_h2_rest(s.h), 0);
    teardown(&s, &c);

    /* A client with the default 65,535-byte connection window that has not given back what
     * it read: a fresh session could not be told the smaller window, so no rest. */
    setup(&s, &c, 0);
    get_and_answer(&s, &c, "/", 100);
    CHECK_INT(moat_h2_rest(s.h), 0);
    pump(&c, s.h, 1);
    CHECK_INT(moat_h2_rest(s.h), 0);
    CHECK_INT(moat_h2_at_rest(s.h), 0);
    teardown(&s, &c);
}

int main(void)
{
    test_request_response();
    test_flow_control_backpressure();
    test_invalid_headers_rejected();
    test_content_length_mismatch();
    test_extended_connect();
    test_rapid_reset();
    test_header_list_limit();
    test_settings_flood_unread();
    test_ping_flood_read();
    test_goaway_graceful();
    test_bad_preface();
    test_frames_after_end_stream();
    test_frames_after_client_reset();
    test_frames_after_server_close_ignored();
    test_lower_stream_id();
    test_closed_ids_remembered_in_a_window();
    test_frame_header_split_across_reads();
    test_rules_on_open_streams();
    test_shared_frame_buffer();
    test_rest_before_any_request();
    test_rest_after_requests();
    test_rest_keeps_stream_ids();
    test_rest_keeps_windows();
    test_rest_only_when_quiet();
    return test_summary("h2");
}
