/* Unit tests for the front-end core and the proxy seam behind it (server/front.c, redirect.c,
 * proxy.c, upstream.c). A recording front end (moat_front_ops_t) hands requests to
 * moat_front_start on a worker loop that this test runs itself; the proxy talks to a tiny
 * HTTP/1.1 app listening on loopback in the same loop. What is checked is what a client or the
 * app would see: moat's own answers (status, Location, no body for HEAD), the 413 before or
 * during a body, the proxied response arriving only through the callbacks (never inside the
 * start call), what reaches the app (forwarded headers, hop-by-hop fields gone, the body), the
 * client address behind trusted_proxies and one access-log line per request. */
#include "front.h"
#include "moat/config.h"
#include "moat/log.h"
#include "moat/runtime.h"
#include "snapshot.h"
#include "test.h"
#include "worker.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* --- the app: one connection at a time, answers each request with what it received ---- */

typedef struct {
    uv_tcp_t server, conn;
    int conn_open;
    char req[8192]; /* the last request, head and body, as received */
    size_t req_len;
    int requests;
    int port;
} app_t;

static app_t app;

static void app_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    static char space[4096];
    *buf = uv_buf_init(space, sizeof space);
}

static void app_written(uv_write_t *wr, int status)
{
    (void)status;
    free(wr);
}

/* A whole request in req: its head, and as many body bytes as Content-Length says. */
static int app_request_complete(void)
{
    app.req[app.req_len] = 0;
    const char *end = strstr(app.req, "\r\n\r\n");
    if (end == NULL)
        return 0;
    const char *cl = strcasestr(app.req, "\r\ncontent-length:");
    size_t body = cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0;
    return app.req_len >= (size_t)(end + 4 - app.req) + body;
}

static void app_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    if (n < 0) {
        uv_close((uv_handle_t *)s, NULL);
        app.conn_open = 0;
        return;
    }
    size_t room = sizeof app.req - 1 - app.req_len;
    size_t take = (size_t)n < room ? (size_t)n : room;
    memcpy(app.req + app.req_len, buf->base, take);
    app.req_len += take;
    if (!app_request_complete())
        return;
    app.requests++;
    static char resp[256];
    int len = snprintf(resp, sizeof resp,
                       "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: yes\r\n"
                       "Connection: keep-alive, x-private\r\nX-Private: hop\r\n\r\nhello");
    uv_write_t *wr = moat_xmalloc(sizeof *wr);
    uv_buf_t b = uv_buf_init(resp, (unsigned)len);
    uv_write(wr, s, &b, 1, app_written);
}

static void app_accept(uv_stream_t *server, int status)
{
    if (status < 0 || app.conn_open)
        return;
    uv_tcp_init(server->loop, &app.conn);
    if (uv_accept(server, (uv_stream_t *)&app.conn) == 0) {
        app.conn_open = 1;
        uv_read_start((uv_stream_t *)&app.conn, app_alloc, app_read);
    } else {
        uv_close((uv_handle_t *)&app.conn, NULL);
    }
}

/* The app's listening socket is made before the worker's loop exists (the runtime must name
 * its port) and handed to that loop later with uv_tcp_open. */
static int app_socket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    CHECK_INT(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    CHECK_INT(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    app.port = ntohs(a.sin_port);
    return fd;
}

/* --- the recording front end ------------------------------------------------------------- */

typedef struct {
    moat_front_t f;
    int status;
    char head[2048]; /* "name: value\n" per response header */
    char body[1024];
    size_t body_len;
    int64_t content_length;
    int has_body, ended, continues, done, done_err, in_start, done_inside_start;
    void (*next)(void); /* what the test does once this request is done */
} rec_t;

static int rec_head(void *front, int status, const moat_header_t *h, size_t n, int64_t cl,
                    int has_body)
{
    rec_t *r = front;
    r->status = status;
    r->content_length = cl;
    r->has_body = has_body;
    r->f.responded = 1;
    size_t used = 0;
    for (size_t i = 0; i < n; i++)
        used += (size_t)snprintf(r->head + used, sizeof r->head - used, "%.*s: %.*s\n",
                                 (int)h[i].name.len, h[i].name.base, (int)h[i].value.len,
                                 h[i].value.base);
    return 0;
}

static int rec_data(void *front, moat_slice_t d)
{
    rec_t *r = front;
    size_t take = MOAT_MIN(d.len, sizeof r->body - 1 - r->body_len);
    memcpy(r->body + r->body_len, d.base, take);
    r->body_len += take;
    return 0;
}

static int rec_end(void *front)
{
    ((rec_t *)front)->ended = 1;
    return 0;
}

static void rec_continue(void *front)
{
    ((rec_t *)front)->continues++;
}

static size_t rec_queued(void *front)
{
    (void)front;
    return 0;
}

static void rec_pause(void *front, int pause)
{
    (void)front;
    (void)pause;
}

static void rec_upgraded(void *front)
{
    (void)front;
}

static void rec_flush(void *front)
{
    (void)front;
}

static void rec_counts(void *front, uint64_t *in, uint64_t *out)
{
    (void)front;
    *in = *out = 0;
}

static uv_timer_t step_timer;

static void rec_done(void *front, int err, const moat_exchange_result_t *res)
{
    rec_t *r = front;
    r->done++;
    r->done_err = err;
    if (r->in_start)
        r->done_inside_start = 1;
    moat_front_finish(&r->f, res);
    if (r->next != NULL) /* the next step runs from the loop, not inside the proxy */
        uv_timer_start(&step_timer, (uv_timer_cb)(void (*)(void))r->next, 0, 0);
}

static const moat_front_ops_t rec_ops = {
    .send_head = rec_head,
    .send_data = rec_data,
    .send_end = rec_end,
    .send_continue = rec_continue,
    .queued = rec_queued,
    .pause_body = rec_pause,
    .upgraded = rec_upgraded,
    .flush = rec_flush,
    .counts = rec_counts,
    .done = rec_done,
};

/* --- driving requests -------------------------------------------------------------------- */

static moat_worker_t worker;
static struct sockaddr_in peer;
static char logpath[] = "/tmp/moat-front-test-XXXXXX";
static int logged_requests; /* how many access-log lines the tests caused */

#define HTTPS_PORT 8443
#define HTTP_PORT  80

typedef struct {
    const char *method, *authority, *target, *protocol;
    const moat_header_t *headers;
    size_t nheaders;
    moat_req_body_t body;
    uint64_t content_length;
    int expect_continue;
} req_t;

static moat_front_result_t start(rec_t *r, int port, int tls, const req_t *q)
{
    void (*next)(void) = r->next;
    memset(r, 0, sizeof *r);
    r->next = next;
    moat_front_init(&r->f, &worker, &rec_ops, r, (const struct sockaddr *)&peer, port, tls);
    moat_front_req_t fr = {
        .method = moat_slice_str(q->method),
        .target = moat_slice_str(q->target),
        .authority = moat_slice_str(q->authority ? q->authority : ""),
        .protocol = moat_slice_str(q->protocol ? q->protocol : ""),
        .headers = q->headers,
        .nheaders = q->nheaders,
        .body = q->body,
        .content_length = q->content_length,
        .expect_continue = q->expect_continue,
        .proto = "HTTP/2",
    };
    r->in_start = 1;
    moat_front_result_t res = moat_front_start(&r->f, &fr);
    r->in_start = 0;
    logged_requests++;
    return res;
}

/* A request moat answers itself: the status, and that the request is over at once. */
static rec_t *answered(int port, int tls, const req_t *q, int want_status)
{
    static rec_t r;
    r.next = NULL;
    CHECK_INT(start(&r, port, tls, q), MOAT_FRONT_ANSWERED);
    CHECK_INT(r.status, want_status);
    CHECK(r.ended);
    CHECK(!moat_front_active(&r.f));
    return &r;
}

static void test_own_answers(void)
{
    /* No authority: 400. A host no site serves: 404, over TLS and plain HTTP alike. */
    answered(HTTPS_PORT, 1, &(req_t){.method = "GET", .target = "/"}, 400);
    rec_t *r = answered(HTTPS_PORT, 1,
                        &(req_t){.method = "GET", .authority = "other.test", .target = "/"}, 404);
    CHECK(r->has_body && r->body_len > 0 && strstr(r->body, "404") != NULL);
    /* HEAD of the same: the head only, with the length a GET would have had. */
    r = answered(HTTPS_PORT, 1,
                 &(req_t){.method = "HEAD", .authority = "other.test", .target = "/"}, 404);
    CHECK_INT(r->has_body, 0);
    CHECK_INT(r->body_len, 0);
    CHECK(r->content_length > 0);

    /* Plain HTTP for a TLS site: 308 to its HTTPS address, with its port, path and query. */
    r = answered(HTTP_PORT, 0,
                 &(req_t){.method = "GET", .authority = "localhost", .target = "/c/1?x=y"}, 308);
    CHECK(strstr(r->head, "location: https://localhost:8443/c/1?x=y\n") != NULL);
    /* An ACME HTTP-01 token nobody asked for: 404, not a redirect the CA would follow. */
    answered(HTTP_PORT, 0,
             &(req_t){.method = "GET",
                      .authority = "localhost",
                      .target = "/.well-known/acme-challenge/unknown-token"},
             404);

    /* CONNECT other than an RFC 8441 websocket: moat is not a forward proxy. */
    answered(HTTPS_PORT, 1,
             &(req_t){.method = "CONNECT", .authority = "localhost:8443", .target = ""}, 501);
    /* A lower-case method is a probe (an app may compare methods without regard to case). */
    answered(HTTPS_PORT, 1,
             &(req_t){.method = "trace", .authority = "localhost:8443", .target = "/"}, 400);
    /* TRACE would echo cookies back: refused, as nginx does. */
    answered(HTTPS_PORT, 1,
             &(req_t){.method = "TRACE", .authority = "localhost:8443", .target = "/"}, 405);
    /* A declared body over max_body (100 bytes here): 413 before a byte is read, and the
     * front end learns the body stays unread; no 100 Continue was sent for it. */
    r = answered(HTTPS_PORT, 1,
                 &(req_t){.method = "POST",
                          .authority = "localhost:8443",
                          .target = "/up",
                          .body = MOAT_REQ_BODY_LENGTH,
                          .content_length = 101,
                          .expect_continue = 1},
                 413);
    CHECK(r->f.body_unread);
    CHECK_INT(r->continues, 0);
    CHECK_INT(app.requests, 0); /* none of the above reached the app */
}

/* --- proxied requests, one after the other, each started when the last is done --------- */

static rec_t px;
static int steps_done;

static void finish_tests(void);

static void step_post_too_large(void)
{
    /* The GET+POST above ran; now a body of unknown length that grows past max_body while
     * streaming: 413 to the client (no response had begun) and the exchange is over. */
    px.next = NULL;
    req_t q = {.method = "POST",
               .authority = "localhost:8443",
               .target = "/stream",
               .body = MOAT_REQ_BODY_STREAM};
    CHECK_INT(start(&px, HTTPS_PORT, 1, &q), MOAT_FRONT_PROXYING);
    char chunk[60];
    memset(chunk, 'z', sizeof chunk);
    CHECK_INT(moat_front_body(&px.f, moat_slice(chunk, sizeof chunk)), 0);
    CHECK_INT(moat_front_body(&px.f, moat_slice(chunk, sizeof chunk)), MOAT_ETOO_LARGE);
    CHECK_INT(px.status, 413);
    CHECK(px.f.body_unread);
    CHECK(!moat_front_active(&px.f));
    steps_done++;
    finish_tests();
}

static void step_post_checked(void)
{
    CHECK_INT(px.status, 200);
    CHECK_INT(px.done_err, 0);
    CHECK(strstr(app.req, "POST /up HTTP/1.1\r\n") == app.req);
    CHECK(strstr(app.req, "\r\n\r\nabcdef") != NULL); /* the body, whole */
    CHECK_INT(px.continues, 1);                       /* Expect: 100-continue was answered */
    steps_done++;
    step_post_too_large();
}

static void step_post(void)
{
    /* The GET was checked; the app's connection went back to the pool. */
    px.next = step_post_checked;
    app.req_len = 0;
    req_t q = {.method = "POST",
               .authority = "localhost:8443",
               .target = "/up",
               .body = MOAT_REQ_BODY_LENGTH,
               .content_length = 6,
               .expect_continue = 1};
    CHECK_INT(start(&px, HTTPS_PORT, 1, &q), MOAT_FRONT_PROXYING);
    CHECK_INT(moat_front_body(&px.f, MOAT_SLICE_LIT("abc")), 0);
    CHECK_INT(moat_front_body(&px.f, MOAT_SLICE_LIT("def")), 0);
    CHECK_INT(moat_front_body_end(&px.f), 0);
}

static void step_get_checked(void)
{
    /* The response came through the callbacks, head, body and end. */
    CHECK_INT(px.done, 1);
    CHECK_INT(px.done_inside_start, 0);
    CHECK_INT(px.done_err, 0);
    CHECK_INT(px.status, 200);
    CHECK(px.ended);
    CHECK_INT(px.body_len, 5);
    CHECK(memcmp(px.body, "hello", 5) == 0);
    CHECK(strcasestr(px.head, "x-app: yes\n") != NULL);
    /* Hop-by-hop fields of the app's response stay between moat and the app. */
    CHECK(strcasestr(px.head, "x-private") == NULL);
    CHECK(strcasestr(px.head, "connection") == NULL);
    /* What reached the app: the chain with the peer appended, and the scheme. */
    CHECK(strstr(app.req, "GET /chat?id=1 HTTP/1.1\r\n") == app.req);
    CHECK(strcasestr(app.req, "\r\nx-forwarded-for: 203.0.113.9, 127.0.0.1\r\n") != NULL);
    CHECK(strcasestr(app.req, "\r\nx-forwarded-proto: https\r\n") != NULL);
    CHECK(strcasestr(app.req, "\r\nx-keep: 1\r\n") != NULL);
    /* The peer is a trusted proxy: the client is the last hop it named. */
    CHECK_STR(px.f.remote, "203.0.113.9");
    CHECK_INT(app.requests, 1);
    steps_done++;
    step_post();
}

static void step_get(uv_timer_t *t)
{
    (void)t;
    test_own_answers();
    static const moat_header_t h[] = {
        {MOAT_SLICE_LIT("x-forwarded-for"), MOAT_SLICE_LIT("203.0.113.9")},
        {MOAT_SLICE_LIT("x-keep"), MOAT_SLICE_LIT("1")},
    };
    px.next = step_get_checked;
    req_t q = {.method = "GET",
               .authority = "localhost:8443",
               .target = "/chat?id=1",
               .headers = h,
               .nheaders = MOAT_ARRAY_LEN(h)};
    CHECK_INT(start(&px, HTTPS_PORT, 1, &q), MOAT_FRONT_PROXYING);
    CHECK_INT(px.done, 0); /* never completes inside the call */
    CHECK(moat_front_active(&px.f));
}

static uv_timer_t watchdog;

/* A request that never ends would hang the test: fail it after 10 s instead. */
static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    fprintf(stderr, "front_test: timed out after %d of 3 proxied steps\n", steps_done);
    CHECK(0);
    finish_tests();
}

static void finish_tests(void)
{
    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_close((uv_handle_t *)&app.server, NULL);
    if (app.conn_open) {
        uv_close((uv_handle_t *)&app.conn, NULL);
        app.conn_open = 0;
    }
    uv_close((uv_handle_t *)&step_timer, NULL);
    moat_worker_stop(&worker);
}

/* --- setup ------------------------------------------------------------------------------- */

static void on_built(moat_runtime_t *rt, const char *err, void *data)
{
    if (rt == NULL)
        fprintf(stderr, "runtime: %s\n", err);
    *(moat_runtime_t **)data = rt;
}

static moat_runtime_t *build_runtime(int app_port)
{
    char text[256];
    snprintf(text, sizeof text,
             "localhost:%d 127.0.0.1:%d max_body=100 trusted_proxies=127.0.0.0/8\n", HTTPS_PORT,
             app_port);
    moat_config_t *cfg = NULL;
    CHECK_INT(moat_config_parse("Moatfile", text, strlen(text), &cfg, NULL), 0);
    if (cfg == NULL)
        return NULL;
    uv_loop_t loop;
    uv_loop_init(&loop);
    moat_runtime_t *rt = NULL;
    moat_runtime_build(&loop, cfg, HTTP_PORT, HTTPS_PORT, on_built, &rt);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return rt;
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int n = 0, c;
    while (f != NULL && (c = fgetc(f)) != EOF)
        n += c == '\n';
    if (f != NULL)
        fclose(f);
    return n;
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    int fd = mkstemp(logpath);
    CHECK(fd >= 0);
    close(fd);
    CHECK_INT(moat_access_log_open(logpath), 0);
    uv_ip4_addr("127.0.0.1", 40000, &peer);

    int app_fd = app_socket();
    int port = app.port;
    moat_runtime_t *rt = build_runtime(port);
    if (rt == NULL)
        return test_summary("front");
    static moat_server_opts_t no_listeners = {.nworkers = 1, .grace_ms = 1000};
    moat_snapshot_t snap = {.rt = rt};
    moat_worker_init(&worker, 0, &no_listeners, &snap);
    moat_runtime_unref(rt);

    uv_tcp_init(&worker.loop, &app.server);
    CHECK_INT(uv_tcp_open(&app.server, app_fd), 0);
    CHECK_INT(uv_listen((uv_stream_t *)&app.server, 8, app_accept), 0);
    uv_timer_init(&worker.loop, &step_timer);
    uv_timer_start(&step_timer, step_get, 0, 0);
    uv_timer_init(&worker.loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, 10000, 0);

    moat_worker_run(&worker);
    moat_worker_cleanup(&worker);

    CHECK_INT(steps_done, 3);
    CHECK_INT(count_lines(logpath), logged_requests); /* one access-log line per request */
    unlink(logpath);
    return test_summary("front");
}
