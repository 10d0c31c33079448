/* Unit tests for the HTTP/1.1 codec: valid heads, every smuggling defence, responses and the
 * chunked decoder. */
#include "moat/http1.h"

#include <stdlib.h>

#include "test.h"

static moat_http1_msg_t msg;
static moat_header_t hdrs[MOAT_HTTP1_MAX_HEADERS];

static int req(const char *s, int *status)
{
    *status = 0;
    return moat_http1_parse_request(s, strlen(s), &msg, hdrs, MOAT_ARRAY_LEN(hdrs), status);
}

/* The status a request head is refused with, or 0 when it parses completely. */
static int req_status(const char *s)
{
    int st;
    int r = req(s, &st);
    if (r > 0)
        return 0;
    if (r == MOAT_ENEED_MORE)
        return -1;
    return st;
}

static int resp(const char *s, int head)
{
    return moat_http1_parse_response(s, strlen(s), head, &msg, hdrs, MOAT_ARRAY_LEN(hdrs));
}

static int sl_is(moat_slice_t s, const char *want)
{
    return s.base != NULL && moat_slice_eq(s, want);
}

static void test_simple_get(void)
{
    const char *s = "GET /index.html?x=1 HTTP/1.1\r\nHost: example.com\r\n"
                    "User-Agent:  t  \r\nAccept:\r\n\r\n";
    int st;
    CHECK_INT(req(s, &st), strlen(s));
    CHECK(sl_is(msg.method, "GET"));
    CHECK(sl_is(msg.target, "/index.html?x=1"));
    CHECK(sl_is(msg.host, "example.com"));
    CHECK_INT(msg.minor_version, 1);
    CHECK_INT(msg.nheaders, 3);
    CHECK(sl_is(msg.headers[1].value, "t"));
    CHECK_INT(msg.headers[2].value.len, 0);
    CHECK_INT(msg.body, MOAT_BODY_NONE);
    CHECK(msg.keep_alive);
    CHECK(!msg.expect_continue);
    CHECK(!msg.upgrade);
    CHECK(sl_is(moat_http1_find_header(&msg, "user-agent"), "t"));
    CHECK(moat_http1_find_header(&msg, "cookie").base == NULL);

    /* Every proper prefix needs more bytes. */
    size_t n = strlen(s);
    for (size_t i = 0; i < n; i++)
        CHECK_INT(moat_http1_parse_request(s, i, &msg, hdrs, 256, &st), MOAT_ENEED_MORE);

    /* head_end fed byte by byte finds the same end. */
    size_t scan = 0, end = 0;
    for (size_t i = 1; i <= n && end == 0; i++)
        end = moat_http1_head_end(s, i, &scan);
    CHECK_INT(end, n);
    scan = 0;
    CHECK_INT(moat_http1_head_end(s, n, &scan), n);
}

static void test_post_and_chunked(void)
{
    int st;
    const char *s = "POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    CHECK_INT(req(s, &st), strlen(s) - 5);
    CHECK_INT(msg.body, MOAT_BODY_LENGTH);
    CHECK_INT(msg.content_length, 5);

    s = "POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(req(s, &st), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_LENGTH);
    CHECK_INT(msg.content_length, 0);

    s = "POST /api HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED \r\n"
        "Expect: 100-Continue\r\n\r\n";
    CHECK_INT(req(s, &st), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_CHUNKED);
    CHECK(msg.expect_continue);

    s = "PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n";
    CHECK_INT(req(s, &st), strlen(s));
    CHECK(msg.content_length == UINT64_C(9223372036854775807));
}

static void test_pipelined(void)
{
    const char *s = "GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n"
                    "Connection: close\r\n\r\n";
    int st;
    int n = req(s, &st);
    CHECK_INT(n, 28);
    CHECK(sl_is(msg.target, "/a"));
    CHECK(msg.keep_alive);
    int m = req(s + n, &st);
    CHECK_INT(m, strlen(s) - (size_t)n);
    CHECK(sl_is(msg.target, "/b"));
    CHECK(!msg.keep_alive);

    /* Up to four stray CRLFs after a previous body are skipped; more are not. */
    s = "\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n";
    CHECK_INT(req(s, &st), strlen(s));
    CHECK(sl_is(msg.target, "/c"));
    size_t scan = 0;
    CHECK_INT(moat_http1_head_end(s, strlen(s), &scan), strlen(s));
    CHECK_INT(req_status("\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
}

static void test_forms_and_flags(void)
{
    int st;
    const char *s = "GET http://Example.com:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n";
    CHECK_INT(req(s, &st), strlen(s));
    CHECK(sl_is(msg.host, "Example.com:8080"));
    CHECK(sl_is(msg.target, "http://Example.com:8080/p?q"));
    CHECK_INT(req_status("GET https://h HTTP/1.1\r\nHost: h\r\n\r\n"), 0);
    CHECK(sl_is(msg.host, "h"));
    CHECK_INT(req_status("GET HTTPS://[::1]:8443?x HTTP/1.1\r\nHost: h\r\n\r\n"), 0);
    CHECK(sl_is(msg.host, "[::1]:8443"));

    CHECK_INT(req_status("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"), 0);
    CHECK(sl_is(msg.target, "*"));
    CHECK_INT(req_status("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"), 0);
    CHECK(sl_is(msg.target, "example.com:443"));

    /* HTTP/1.0: no Host needed, keep-alive only when asked for. */
    CHECK_INT(req_status("GET / HTTP/1.0\r\n\r\n"), 0);
    CHECK_INT(msg.minor_version, 0);
    CHECK(!msg.keep_alive);
    CHECK(msg.host.base == NULL);
    CHECK_INT(req_status("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"), 0);
    CHECK(msg.keep_alive);
    CHECK_INT(req_status("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"), 0);
    CHECK(!msg.keep_alive);
    CHECK_INT(req_status("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                         "Expect: 100-continue\r\n\r\n"),
              0);
    CHECK(!msg.upgrade);
    CHECK(!msg.expect_continue);

    /* Connection may be a list and may repeat. */
    CHECK_INT(req_status("GET / HTTP/1.1\r\nHost: h\r\nConnection: x-foo\r\n"
                         "Connection: ,  CLOSE ,\r\n\r\n"),
              0);
    CHECK(!msg.keep_alive);
    CHECK(moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("X-Foo")));
    CHECK(moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("close")));
    CHECK(moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("Keep-Alive")));
    CHECK(moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("transfer-encoding")));
    CHECK(moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("TE")));
    CHECK(!moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("Host")));
    CHECK(!moat_http1_is_hop_by_hop(&msg, MOAT_SLICE_LIT("x-fo")));

    /* Websocket upgrade. */
    CHECK_INT(req_status("GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n"
                         "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"),
              0);
    CHECK(msg.upgrade);
    CHECK(msg.keep_alive);
    CHECK_INT(req_status("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"), 0);
    CHECK(!msg.upgrade);

    /* HT and obs-text are fine in values; an empty Host is allowed. */
    CHECK_INT(req_status("GET / HTTP/1.1\r\nHost:\r\nX: a\tb \xc3\xa9\r\n\r\n"), 0);
    CHECK_INT(msg.host.len, 0);
    CHECK(sl_is(msg.headers[1].value, "a\tb \xc3\xa9"));
}

static void test_big_cookies(void)
{
    /* 16 Cookie headers of 4 KiB each: 64 KiB of cookies must pass. */
    moat_buf_t b = {0};
    moat_buf_appendf(&b, "GET / HTTP/1.1\r\nHost: h\r\n");
    for (int i = 0; i < 16; i++) {
        moat_buf_appendf(&b, "Cookie: c%d=", i);
        for (int j = 0; j < 4096; j++)
            moat_buf_append(&b, "a", 1);
        moat_buf_appendf(&b, "\r\n");
    }
    moat_buf_appendf(&b, "\r\n");
    int st;
    CHECK_INT(moat_http1_parse_request(moat_buf_data(&b), moat_buf_size(&b), &msg, hdrs, 256, &st),
              moat_buf_size(&b));
    CHECK_INT(msg.nheaders, 17);
    moat_buf_free(&b);
}

static void test_smuggling(void)
{
#define H "GET / HTTP/1.1\r\nHost: h\r\n"
#define P "POST / HTTP/1.1\r\nHost: h\r\n"
    /* Content-Length together with Transfer-Encoding, in either order. */
    CHECK_INT(req_status(P "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"), 400);
    /* Duplicate or malformed Content-Length. */
    CHECK_INT(req_status(P "Content-Length: 5\r\nContent-Length: 5\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 5\r\ncontent-length: 6\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 5, 5\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: \r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: abc\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: +5\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: -1\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 0x10\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 5 5\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 9223372036854775808\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Content-Length: 99999999999999999999999\r\n\r\n"), 400);
    /* Transfer-Encoding other than exactly chunked. */
    CHECK_INT(req_status(P "Transfer-Encoding: gzip, chunked\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: chunked, chunked\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
              400);
    CHECK_INT(req_status(P "Transfer-Encoding: identity\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: chunked;q=1\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: \"chunked\"\r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: \r\n\r\n"), 400);
    CHECK_INT(req_status(P "Transfer-Encoding: xchunked\r\n\r\n"), 501);
    CHECK_INT(req_status(P "Transfer-Encoding: gzip\r\n\r\n"), 501);
    /* HTTP/1.0 with Transfer-Encoding. */
    CHECK_INT(req_status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
    /* obs-fold, whitespace before the colon, empty or non-token names. */
    CHECK_INT(req_status(H "X-A: a\r\n b\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A: a\r\n\tb\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\r\n Host: h\r\n\r\n"), 400);
    CHECK_INT(req_status(H "Content-Length : 5\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A\t: a\r\n\r\n"), 400);
    CHECK_INT(req_status(H ": a\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X(A): a\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X\xc3\xa9: a\r\n\r\n"), 400);
    CHECK_INT(req_status(H "no colon here\r\n\r\n"), 400);
    /* Bare CR anywhere, bare LF line endings. */
    CHECK_INT(req_status(H "X-A: a\rb\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A\r: a\r\n\r\n"), 400);
    CHECK_INT(req_status("GET /\r HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\rHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A: a\r\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A: a\n\r\n"), 400);
    CHECK_INT(req_status(H "\n"), 400);
    CHECK_INT(req_status(H "X-A: a\rb"), 400); /* caught before the head is complete */
    /* NUL and other control characters; HT is allowed (tested above). */
    CHECK_INT(req(H "X-A: a\0b\r\n\r\n", &(int){0}), MOAT_ENEED_MORE); /* strlen stops */
    {
        static const char nul[] = H "X-A: a\0b\r\n\r\n";
        int st = 0;
        CHECK_INT(moat_http1_parse_request(nul, sizeof(nul) - 1, &msg, hdrs, 256, &st),
                  MOAT_EPARSE);
        CHECK_INT(st, 400);
        CHECK_INT(moat_http1_parse_request(nul, sizeof(H) + 6, &msg, hdrs, 256, &st), MOAT_EPARSE);
    }
    CHECK_INT(req_status(H "X-A: a\x01z\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A: a\x7fz\r\n\r\n"), 400);
    CHECK_INT(req_status(H "X-A: a\x1bz\r\n\r\n"), 400);
    /* Methods. */
    CHECK_INT(req_status("G(T / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status(" GET / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET  / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    /* Targets. */
    CHECK_INT(req_status("GET x HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET * HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT h HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT h:x HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT :443 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("CONNECT u@h:443 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET  HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
    /* HTTP/0.9 and versions. */
    CHECK_INT(req_status("GET /\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / \r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/2.0\r\nHost: h\r\n\r\n"), 505);
    CHECK_INT(req_status("GET / HTTP/1.2\r\nHost: h\r\n\r\n"), 505);
    CHECK_INT(req_status("GET / HTTP/12.1\r\nHost: h\r\n\r\n"), 505);
    CHECK_INT(req_status("GET / HTTP/1.10\r\nHost: h\r\n\r\n"), 505);
    CHECK_INT(req_status("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 505);
    CHECK_INT(req_status("GET / http/1.1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1\r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1 \r\nHost: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.x\r\nHost: h\r\n\r\n"), 400);
    /* Host: missing in 1.1, repeated, or not an authority. */
    CHECK_INT(req_status("GET / HTTP/1.1\r\n\r\n"), 400);
    CHECK_INT(req_status("GET http://h/ HTTP/1.1\r\n\r\n"), 400);
    CHECK_INT(req_status(H "Host: h\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), 400);
    CHECK_INT(req_status("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
#undef H
#undef P
}

static void test_limits(void)
{
    int st;
    /* Request line over MAX_TARGET: 414 whether or not it is complete. */
    size_t n = MOAT_HTTP1_MAX_TARGET + 100;
    char *b = malloc(n + 64);
    memcpy(b, "GET /", 5);
    memset(b + 5, 'a', n - 5);
    CHECK_INT(moat_http1_parse_request(b, n, &msg, hdrs, 256, &st), MOAT_EPARSE);
    CHECK_INT(st, 414);
    memcpy(b + n, " HTTP/1.1\r\nHost: h\r\n\r\n", 23);
    CHECK_INT(moat_http1_parse_request(b, n + 22, &msg, hdrs, 256, &st), MOAT_EPARSE);
    CHECK_INT(st, 414);
    /* Just under the limit is fine. */
    size_t ok = MOAT_HTTP1_MAX_TARGET - 20;
    memcpy(b + ok, " HTTP/1.1\r\nHost: h\r\n\r\n", 23);
    CHECK_INT(moat_http1_parse_request(b, ok + 22, &msg, hdrs, 256, &st), (int)ok + 22);
    free(b);

    /* Head over MAX_HEAD without an end: 431, complete or not. */
    moat_buf_t big = {0};
    moat_buf_appendf(&big, "GET / HTTP/1.1\r\nHost: h\r\n");
    while (moat_buf_size(&big) < MOAT_HTTP1_MAX_HEAD + 10)
        moat_buf_appendf(&big, "X-Pad: %01000d\r\n", 0);
    CHECK_INT(
        moat_http1_parse_request(moat_buf_data(&big), moat_buf_size(&big), &msg, hdrs, 256, &st),
        MOAT_EPARSE);
    CHECK_INT(st, 431);
    moat_buf_appendf(&big, "\r\n");
    st = 0;
    CHECK_INT(
        moat_http1_parse_request(moat_buf_data(&big), moat_buf_size(&big), &msg, hdrs, 256, &st),
        MOAT_EPARSE);
    CHECK_INT(st, 431);
    /* One long value line with no LF at all. */
    moat_buf_reset(&big);
    moat_buf_appendf(&big, "GET / HTTP/1.1\r\nX: ");
    while (moat_buf_size(&big) < MOAT_HTTP1_MAX_HEAD)
        moat_buf_append(&big, "y", 1);
    CHECK_INT(
        moat_http1_parse_request(moat_buf_data(&big), moat_buf_size(&big), &msg, hdrs, 256, &st),
        MOAT_EPARSE);
    CHECK_INT(st, 431);

    /* Too many headers for MAX_HEADERS or for the caller's array. */
    moat_buf_reset(&big);
    moat_buf_appendf(&big, "GET / HTTP/1.1\r\nHost: h\r\n");
    for (int i = 0; i < MOAT_HTTP1_MAX_HEADERS; i++)
        moat_buf_appendf(&big, "X: %d\r\n", i);
    moat_buf_appendf(&big, "\r\n");
    CHECK_INT(
        moat_http1_parse_request(moat_buf_data(&big), moat_buf_size(&big), &msg, hdrs, 256, &st),
        MOAT_EPARSE);
    CHECK_INT(st, 431);
    moat_header_t few[4];
    const char *s = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    CHECK_INT(moat_http1_parse_request(s, strlen(s), &msg, few, 4, &st), strlen(s));
    s = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
    CHECK_INT(moat_http1_parse_request(s, strlen(s), &msg, few, 4, &st), MOAT_EPARSE);
    CHECK_INT(st, 431);
    moat_buf_free(&big);
}

static void test_responses(void)
{
    const char *s = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.status, 200);
    CHECK(sl_is(msg.reason, "OK"));
    CHECK_INT(msg.body, MOAT_BODY_LENGTH);
    CHECK_INT(msg.content_length, 12);
    CHECK(msg.keep_alive);
    for (size_t i = 0; i < strlen(s); i++)
        CHECK_INT(moat_http1_parse_response(s, i, 0, &msg, hdrs, 256), MOAT_ENEED_MORE);

    /* HEAD: no body whatever the headers say. */
    CHECK_INT(resp(s, 1), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_NONE);

    s = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_CHUNKED);
    CHECK(msg.keep_alive);

    s = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_UNTIL_CLOSE);
    CHECK(!msg.keep_alive);

    s = "HTTP/1.1 204 No Content\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_NONE);
    CHECK(msg.keep_alive);

    s = "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.body, MOAT_BODY_NONE);

    s = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
    CHECK_INT(resp(s, 0), 25);
    CHECK_INT(msg.status, 100);
    CHECK_INT(msg.body, MOAT_BODY_NONE);

    s = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.status, 101);
    CHECK_INT(msg.body, MOAT_BODY_NONE);
    CHECK(msg.upgrade);

    /* Tolerated from upstreams: HTTP/1.0 keep-alive, no reason phrase, bare LF. */
    s = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK(msg.keep_alive);
    CHECK_INT(msg.minor_version, 0);
    s = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK(!msg.keep_alive);
    s = "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.reason.len, 0);
    s = "HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    s = "HTTP/1.1 200 OK\nServer: x\nContent-Length: 3\n\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK_INT(msg.nheaders, 2);
    CHECK(sl_is(msg.headers[0].value, "x"));
    size_t scan = 0;
    CHECK_INT(moat_http1_head_end(s, strlen(s), &scan), strlen(s));
    s = "HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(resp(s, 0), strlen(s));
    CHECK(!msg.keep_alive);

    /* Refused: the proxy answers 502. */
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 0),
              MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 0),
              MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nX : a\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 20 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 099 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 2000 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/2.0 200 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1  200 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("ICY 200 OK\r\n\r\n", 0), MOAT_EPARSE);
    CHECK_INT(resp("HTTP/1.1 200 O\x01K\r\n\r\n", 0), MOAT_EPARSE);
}

/* Decode `in` split into pieces of `step` bytes (0: all at once). Returns 1 when the body
 * ended, with the data in out and the bytes used in *used; a negative code on error. */
static int chunked_all(const char *in, size_t len, size_t step, moat_buf_t *out, size_t *used)
{
    moat_http1_chunked_t st;
    moat_http1_chunked_init(&st);
    size_t off = 0;
    moat_buf_reset(out);
    while (off < len) {
        size_t piece = step == 0 || len - off < step ? len - off : step;
        size_t p = 0;
        while (p < piece) {
            size_t c;
            moat_slice_t d;
            int r = moat_http1_chunked_decode(&st, in + off + p, piece - p, &c, &d);
            if (r < 0)
                return r;
            if (d.len > 0) {
                if (d.base < in + off + p || d.base + d.len > in + off + piece)
                    return -999; /* the slice must point into the input */
                moat_buf_append(out, d.base, d.len);
            }
            p += c;
            if (r == 1) {
                *used = off + p;
                return 1;
            }
            if (c == 0)
                return -998; /* no progress */
        }
        off += piece;
    }
    *used = off;
    return 0;
}

static void test_chunked(void)
{
    const char body[] = "5;ext=1;q=\"a b\"\r\nhello\r\n6 ; foo\r\n world\r\n"
                        "000A\r\n0123456789\r\n0\r\nX-Trailer: v\r\nY:\r\n\r\nNEXT";
    size_t len = sizeof(body) - 1;
    moat_buf_t out = {0};
    size_t used = 0;
    size_t steps[] = {0, 1, 2, 3, 7, 64};
    for (size_t i = 0; i < MOAT_ARRAY_LEN(steps); i++) {
        used = 0;
        CHECK_INT(chunked_all(body, len, steps[i], &out, &used), 1);
        CHECK_INT(used, len - 4);
        CHECK_INT(moat_buf_size(&out), 21);
        CHECK(moat_buf_size(&out) == 21 &&
              memcmp(moat_buf_data(&out), "hello world0123456789", 21) == 0);
    }

    /* Incomplete body: needs more, no error. */
    CHECK_INT(chunked_all(body, 30, 0, &out, &used), 0);

    /* After the end, the decoder reports done and consumes nothing. */
    moat_http1_chunked_t st;
    moat_http1_chunked_init(&st);
    size_t c;
    moat_slice_t d;
    CHECK_INT(moat_http1_chunked_decode(&st, "0\r\n\r\nX", 6, &c, &d), 1);
    CHECK_INT(c, 5);
    CHECK_INT(moat_http1_chunked_decode(&st, "X", 1, &c, &d), 1);
    CHECK_INT(c, 0);

    /* Malformed framing. */
    static const char *bad[] = {
        "\r\n",                          /* no digits */
        "g\r\n",                         /* not hex */
        "-5\r\nhello\r\n0\r\n\r\n",      /* sign */
        "0x5\r\nhello\r\n0\r\n\r\n",     /* prefix */
        "5\nhello\r\n0\r\n\r\n",         /* bare LF */
        "5\rhello\r\n0\r\n\r\n",         /* bare CR */
        "5\r\nhelloX\r\n0\r\n\r\n",      /* data longer than size */
        "5\r\nhello\n0\r\n\r\n",         /* bare LF after data */
        "5 x\r\nhello\r\n0\r\n\r\n",     /* junk after size */
        "5;a\x01\r\nhello\r\n0\r\n\r\n", /* control char in extension */
        "10000000000000000\r\n",         /* 2^64: overflow */
        "ffffffffffffffff\r\n",          /* absurd size */
        "0\r\nbad trailer\r\n\r\n",      /* trailer without colon */
        "0\r\n trailer: x\r\n\r\n",      /* folded trailer */
        "0\r\nX: a\rb\r\n\r\n",          /* bare CR in trailer */
        "0\r\n\rX",                      /* final CR without LF */
        "0\r\n\n",                       /* final bare LF */
    };
    for (size_t i = 0; i < MOAT_ARRAY_LEN(bad); i++) {
        int r0 = chunked_all(bad[i], strlen(bad[i]), 0, &out, &used);
        int r1 = chunked_all(bad[i], strlen(bad[i]), 1, &out, &used);
        if (r0 != MOAT_EPARSE || r1 != MOAT_EPARSE)
            fprintf(stderr, "bad chunked case %zu: %d %d\n", i, r0, r1);
        CHECK_INT(r0, MOAT_EPARSE);
        CHECK_INT(r1, MOAT_EPARSE);
    }

    /* A large but sane size with leading zeros parses (and waits for data). */
    CHECK_INT(chunked_all("00000000000000000000000000fffffff\r\nab", 37, 0, &out, &used), 0);
    CHECK_INT(moat_buf_size(&out), 2);

    /* Limits: a huge extension line and a huge trailer section. */
    moat_buf_t big = {0};
    moat_buf_appendf(&big, "1;");
    for (int i = 0; i < MOAT_HTTP1_MAX_CHUNK_LINE; i++)
        moat_buf_append(&big, "e", 1);
    moat_buf_appendf(&big, "\r\nx\r\n0\r\n\r\n");
    CHECK_INT(chunked_all(moat_buf_data(&big), moat_buf_size(&big), 0, &out, &used), MOAT_EPARSE);
    moat_buf_reset(&big);
    moat_buf_appendf(&big, "0\r\n");
    for (int i = 0; i < 400; i++)
        moat_buf_appendf(&big, "X-T%d: %060d\r\n", i, i);
    moat_buf_appendf(&big, "\r\n");
    CHECK_INT(chunked_all(moat_buf_data(&big), moat_buf_size(&big), 0, &out, &used), MOAT_EPARSE);
    moat_buf_free(&big);
    moat_buf_free(&out);

    char pre[MOAT_HTTP1_CHUNK_PREFIX_MAX];
    CHECK_INT(moat_http1_chunk_prefix(pre, 0), 3);
    CHECK(memcmp(pre, "0\r\n", 3) == 0);
    CHECK_INT(moat_http1_chunk_prefix(pre, 255), 4);
    CHECK(memcmp(pre, "ff\r\n", 4) == 0);
    CHECK_INT(moat_http1_chunk_prefix(pre, UINT64_MAX), 18);
}

int main(void)
{
    test_simple_get();
    test_post_and_chunked();
    test_pipelined();
    test_forms_and_flags();
    test_big_cookies();
    test_smuggling();
    test_limits();
    test_responses();
    test_chunked();
    return test_summary("http1");
}
