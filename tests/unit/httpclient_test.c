/* Unit tests for the control plane's HTTP client (server/httpclient.c), the one ACME uses:
 * each case is a scripted server on loopback in the test's own loop that reads the request
 * and writes canned response bytes, then closes. What is checked is what the ACME client is
 * handed: status, headers, the body however it was framed (length, chunked, until close), and
 * a clear error (never a callback inside the call, exactly one callback) for a refused
 * connection, a server that never answers, a truncated body and one over the size bound. */
#include "moat/httpclient.h"
#include "moat/log.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

static uv_loop_t loop;

/* --- a scripted server: one connection, one canned answer -------------------------------- */

typedef struct {
    uv_tcp_t server, conn;
    const char *answer; /* NULL: read and never answer */
    char request[4096];
    size_t request_len;
    int port;
} script_t;

static void srv_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    script_t *s = h->data;
    *buf = uv_buf_init(s->request + s->request_len,
                       (unsigned)(sizeof s->request - 1 - s->request_len));
}

static void srv_written(uv_write_t *wr, int status)
{
    (void)status;
    uv_close((uv_handle_t *)wr->handle, NULL); /* the end of a close-delimited body */
    free(wr);
}

static void srv_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    (void)buf;
    script_t *s = st->data;
    if (n < 0) {
        if (!uv_is_closing((uv_handle_t *)st))
            uv_close((uv_handle_t *)st, NULL);
        return;
    }
    s->request_len += (size_t)n;
    s->request[s->request_len] = 0;
    if (strstr(s->request, "\r\n\r\n") == NULL || s->answer == NULL)
        return;
    uv_read_stop(st);
    uv_write_t *wr = moat_xmalloc(sizeof *wr);
    uv_buf_t b = uv_buf_init((char *)s->answer, (unsigned)strlen(s->answer));
    uv_write(wr, st, &b, 1, srv_written);
}

static void srv_accept(uv_stream_t *server, int status)
{
    script_t *s = server->data;
    if (status < 0)
        return;
    uv_tcp_init(&loop, &s->conn);
    s->conn.data = s;
    if (uv_accept(server, (uv_stream_t *)&s->conn) == 0)
        uv_read_start((uv_stream_t *)&s->conn, srv_alloc, srv_read);
    uv_close((uv_handle_t *)&s->server, NULL); /* one connection per script */
}

static void script_start(script_t *s, const char *answer)
{
    memset(s, 0, sizeof *s);
    s->answer = answer;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(&loop, &s->server);
    s->server.data = s;
    CHECK_INT(uv_tcp_bind(&s->server, (const struct sockaddr *)&a, 0), 0);
    CHECK_INT(uv_listen((uv_stream_t *)&s->server, 1, srv_accept), 0);
    struct sockaddr_in got;
    int len = sizeof got;
    uv_tcp_getsockname(&s->server, (struct sockaddr *)&got, &len);
    s->port = ntohs(got.sin_port);
}

/* --- what the client hands back --------------------------------------------------------- */

typedef struct {
    int calls, err, status;
    char body[4096];
    size_t body_len;
    char location[256];
    char nonce[256];
} got_t;

static void on_response(void *data, const moat_httpc_response_t *r)
{
    got_t *g = data;
    g->calls++;
    g->err = r->err;
    g->status = r->status;
    g->body_len = r->body_len;
    if (r->body != NULL)
        snprintf(g->body, sizeof g->body, "%.*s", (int)r->body_len, r->body);
    const char *v = moat_httpc_header(r, "location", 0, NULL);
    snprintf(g->location, sizeof g->location, "%s", v ? v : "");
    v = moat_httpc_header(r, "replay-nonce", 0, NULL);
    snprintf(g->nonce, sizeof g->nonce, "%s", v ? v : "");
}

/* One request against a fresh scripted server; the loop runs until both sides are done. */
static void exchange(const char *method, const char *body, const char *answer, uint64_t timeout_ms,
                     got_t *g, script_t *s)
{
    char err[256] = "";
    moat_httpc_t *h = moat_httpc_new(&loop, NULL, timeout_ms, err, sizeof err);
    CHECK(h != NULL);
    if (h == NULL) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    script_start(s, answer);
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/acme/new-order", s->port);
    memset(g, 0, sizeof *g);
    CHECK_INT(moat_httpc_request(h, method, url, body ? "application/jose+json" : NULL, body,
                                 body ? strlen(body) : 0, on_response, g),
              0);
    CHECK_INT(g->calls, 0); /* never inside the call */
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(g->calls, 1);
    moat_httpc_free(h);
    uv_run(&loop, UV_RUN_DEFAULT);
}

static void test_framings(void)
{
    got_t g;
    script_t s;
    /* Content-Length, with the headers ACME reads. */
    exchange("POST", "{\"payload\":\"\"}",
             "HTTP/1.1 201 Created\r\nContent-Length: 11\r\nLocation: https://ca/order/1\r\n"
             "Replay-Nonce: abc123\r\n\r\n{\"ok\":true}",
             5000, &g, &s);
    CHECK_INT(g.err, 0);
    CHECK_INT(g.status, 201);
    CHECK_STR(g.body, "{\"ok\":true}");
    CHECK_STR(g.location, "https://ca/order/1");
    CHECK_STR(g.nonce, "abc123");
    /* What the server got: the method, origin-form target, Host, the body and its type. */
    CHECK(strncmp(s.request, "POST /acme/new-order HTTP/1.1\r\n", 31) == 0);
    CHECK(strcasestr(s.request, "\r\nhost: 127.0.0.1:") != NULL);
    CHECK(strcasestr(s.request, "\r\ncontent-type: application/jose+json\r\n") != NULL);
    CHECK(strstr(s.request, "\r\n\r\n{\"payload\":\"\"}") != NULL);

    /* Chunked, split across chunk boundaries. */
    exchange("GET", NULL,
             "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             "4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
             5000, &g, &s);
    CHECK_INT(g.err, 0);
    CHECK_INT(g.status, 200);
    CHECK_STR(g.body, "{\"a\":1}");

    /* No length at all: the body ends with the connection. */
    exchange("GET", NULL, "HTTP/1.1 200 OK\r\n\r\nuntil-close", 5000, &g, &s);
    CHECK_INT(g.err, 0);
    CHECK_STR(g.body, "until-close");

    /* 204: no body, whatever follows. */
    exchange("GET", NULL, "HTTP/1.1 204 No Content\r\n\r\n", 5000, &g, &s);
    CHECK_INT(g.err, 0);
    CHECK_INT(g.status, 204);
    CHECK_INT(g.body_len, 0);
}

static void test_failures(void)
{
    got_t g;
    script_t s;
    /* A body cut short of its Content-Length is an error, not a short document. */
    exchange("GET", NULL, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", 5000, &g, &s);
    CHECK(g.err < 0);
    CHECK_INT(g.status, 0);
    /* Not HTTP at all. */
    exchange("GET", NULL, "SSH-2.0-OpenSSH_9.2\r\n\r\n", 5000, &g, &s);
    CHECK(g.err < 0);
    /* A server that reads the request and never answers: the timeout ends it. */
    uint64_t t0 = uv_now(&loop);
    exchange("GET", NULL, NULL, 300, &g, &s);
    CHECK_INT(g.err, MOAT_ETIMEOUT);
    uv_update_time(&loop);
    CHECK(uv_now(&loop) - t0 < 5000);
    /* A body over the bound (1 MiB) is refused, not collected. */
    static char big[200];
    snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n",
             MOAT_HTTPC_MAX_BODY + 1);
    exchange("GET", NULL, big, 5000, &g, &s);
    CHECK(g.err < 0);

    /* Nobody listening: a refused connection, reported through the callback. */
    char err[256];
    moat_httpc_t *h = moat_httpc_new(&loop, NULL, 5000, err, sizeof err);
    script_start(&s, NULL);
    int port = s.port;
    uv_close((uv_handle_t *)&s.server, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", port);
    memset(&g, 0, sizeof g);
    CHECK_INT(moat_httpc_request(h, "GET", url, NULL, NULL, 0, on_response, &g), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(g.calls, 1);
    CHECK(g.err < 0);

    /* Extra header lines that could start another header or end the head are refused. */
    static const char *const bad_headers[] = {"X: a",         "X: a\nY: b\r\n", "X: a\r\n\r\n",
                                              "\r\nX: a\r\n", "X: a\rY: b\r\n", "\n"};
    for (size_t i = 0; i < sizeof bad_headers / sizeof *bad_headers; i++)
        CHECK_INT(
            moat_httpc_request_ex(h, "GET", url, bad_headers[i], NULL, NULL, 0, on_response, &g),
            MOAT_EINVAL);

    /* Freeing the client with a request in flight: its callback runs once, with ECLOSED. */
    script_start(&s, NULL);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", s.port);
    memset(&g, 0, sizeof g);
    CHECK_INT(moat_httpc_request(h, "GET", url, NULL, NULL, 0, on_response, &g), 0);
    uv_run(&loop, UV_RUN_NOWAIT);
    moat_httpc_free(h);
    CHECK_INT(g.calls, 1);
    CHECK_INT(g.err, MOAT_ECLOSED);
    if (!uv_is_closing((uv_handle_t *)&s.server))
        uv_close((uv_handle_t *)&s.server, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR + 1;
    uv_loop_init(&loop);
    test_framings();
    test_failures();
    CHECK_INT(uv_loop_close(&loop), 0); /* nothing left open */
    return test_summary("httpclient");
}
