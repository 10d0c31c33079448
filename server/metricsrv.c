/* The metrics endpoint (server/metricsrv.h). */
#include "metricsrv.h"
#include "moat/http1.h"
#include "moat/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct mconn mconn_t;

struct moat_metricsrv {
    uv_tcp_t tcp;
    uv_loop_t *loop;
    moat_metrics_render_cb render;
    void *data;
    mconn_t *conns;
    int nconns;
};

struct mconn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    moat_metricsrv_t *m;
    mconn_t *next, *prev;
    int refs;
    unsigned closing : 1;
    unsigned answered : 1;
    size_t len, scan;
    moat_buf_t out;
    char buf[MOAT_METRICSRV_HEAD_MAX];
};

static void conn_closed(uv_handle_t *h)
{
    mconn_t *k = h->data;
    if (--k->refs > 0)
        return;
    moat_buf_free(&k->out);
    free(k);
}

static void conn_close(mconn_t *k)
{
    if (k->closing)
        return;
    k->closing = 1;
    if (k->prev)
        k->prev->next = k->next;
    else if (k->m)
        k->m->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    if (k->m)
        k->m->nconns--;
    uv_close((uv_handle_t *)&k->timer, conn_closed);
    uv_close((uv_handle_t *)&k->tcp, conn_closed);
}

static void on_timeout(uv_timer_t *t)
{
    conn_close(t->data);
}

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    conn_close(w->data);
}

static void respond(mconn_t *k, int status, const char *ctype, const char *extra, int head_only,
                    moat_buf_t *body)
{
    k->answered = 1;
    uv_read_stop((uv_stream_t *)&k->tcp);
    size_t blen = body ? moat_buf_size(body) : 0;
    moat_buf_appendf(&k->out,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                     "Connection: close\r\n\r\n",
                     status, moat_http_reason(status), ctype, blen, extra);
    if (body && !head_only)
        moat_buf_append(&k->out, moat_buf_data(body), blen);
    uv_buf_t b = uv_buf_init((char *)moat_buf_data(&k->out), (unsigned)moat_buf_size(&k->out));
    k->wr.data = k;
    if (uv_write(&k->wr, (uv_stream_t *)&k->tcp, &b, 1, on_written) != 0)
        conn_close(k);
}

static void respond_text(mconn_t *k, int status, const char *extra, const char *text)
{
    moat_buf_t body = {0};
    moat_buf_puts(&body, text);
    respond(k, status, "text/plain; charset=utf-8", extra, 0, &body);
    moat_buf_free(&body);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    mconn_t *k = h->data;
    b->base = k->buf + k->len;
    b->len = sizeof k->buf - k->len;
}

static void handle(mconn_t *k)
{
    moat_http1_msg_t msg;
    moat_header_t headers[64];
    int status = 400;
    int r =
        moat_http1_parse_request(k->buf, k->len, &msg, headers, MOAT_ARRAY_LEN(headers), &status);
    if (r == MOAT_ENEED_MORE) {
        if (k->len == sizeof k->buf)
            respond_text(k, 431, "", "request head too large\n");
        return;
    }
    if (r < 0) {
        respond_text(k, status, "", "bad request\n");
        return;
    }
    int head = moat_slice_eq(msg.method, "HEAD");
    if (!head && !moat_slice_eq(msg.method, "GET")) {
        respond_text(k, 405, "Allow: GET, HEAD\r\n", "only GET /metrics\n");
        return;
    }
    moat_slice_t path = moat_http1_origin_form(msg.target);
    for (size_t i = 0; i < path.len; i++)
        if (path.base[i] == '?')
            path.len = i;
    if (!moat_slice_eq(path, "/metrics")) {
        respond_text(k, 404, "", "moat serves its metrics at /metrics\n");
        return;
    }
    moat_buf_t body = {0};
    k->m->render(&body, k->m->data);
    respond(k, 200, "text/plain; version=0.0.4; charset=utf-8", "", head, &body);
    moat_buf_free(&body);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    mconn_t *k = st->data;
    if (n < 0) {
        conn_close(k);
        return;
    }
    k->len += (size_t)n;
    /* A request body is not read: only GET and HEAD are answered, then the connection ends. */
    if (moat_http1_head_end(k->buf, k->len, &k->scan) == 0 && k->len < sizeof k->buf)
        return;
    handle(k);
}

static void on_connection(uv_stream_t *server, int status)
{
    moat_metricsrv_t *m = server->data;
    if (status != 0)
        return;
    mconn_t *k = moat_xcalloc(1, sizeof *k);
    uv_tcp_init(m->loop, &k->tcp);
    uv_timer_init(m->loop, &k->timer);
    k->tcp.data = k->timer.data = k;
    k->refs = 2;
    if (uv_accept(server, (uv_stream_t *)&k->tcp) != 0 || m->nconns >= MOAT_METRICSRV_MAX_CONNS) {
        k->closing = 1; /* too many scrapers at once: this one tries again */
        uv_close((uv_handle_t *)&k->timer, conn_closed);
        uv_close((uv_handle_t *)&k->tcp, conn_closed);
        return;
    }
    k->m = m;
    m->nconns++;
    k->next = m->conns;
    if (m->conns)
        m->conns->prev = k;
    m->conns = k;
    uv_timer_start(&k->timer, on_timeout, MOAT_METRICSRV_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read);
}

static void server_closed(uv_handle_t *h)
{
    free(h->data);
}

int moat_metricsrv_open(uv_loop_t *loop, const char *addr, moat_metrics_render_cb render,
                        void *data, moat_metricsrv_t **out, char *err, size_t errlen)
{
    *out = NULL;
    char host[128];
    const char *colon = strrchr(addr, ':');
    struct sockaddr_storage ss;
    int r = UV_EINVAL;
    if (colon != NULL && (size_t)(colon - addr) < sizeof host) {
        char *end;
        long port = strtol(colon + 1, &end, 10);
        size_t hl = (size_t)(colon - addr);
        memcpy(host, addr, hl);
        host[hl] = 0;
        if (*end == 0 && port > 0 && port < 65536) {
            if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
                host[hl - 1] = 0;
                r = uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)&ss);
            } else {
                r = uv_ip4_addr(host, (int)port, (struct sockaddr_in *)&ss);
            }
        }
    }
    if (r != 0) {
        snprintf(err, errlen,
                 "--metrics expects ADDRESS:PORT, such as 127.0.0.1:9180 or [::1]:9180, got '%s'",
                 addr);
        return MOAT_EINVAL;
    }
    moat_metricsrv_t *m = moat_xcalloc(1, sizeof *m);
    m->loop = loop;
    m->render = render;
    m->data = data;
    uv_tcp_init(loop, &m->tcp);
    m->tcp.data = m;
    r = uv_tcp_bind(&m->tcp, (struct sockaddr *)&ss, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&m->tcp, 64, on_connection);
    if (r != 0) {
        snprintf(err, errlen, "--metrics: cannot listen on %s: %s", addr, uv_strerror(r));
        uv_close((uv_handle_t *)&m->tcp, server_closed);
        return MOAT_EIO;
    }
    *out = m;
    return 0;
}

void moat_metricsrv_close(moat_metricsrv_t *m)
{
    if (m == NULL)
        return;
    while (m->conns != NULL)
        conn_close(m->conns);
    uv_close((uv_handle_t *)&m->tcp, server_closed);
}
