/* HTTP/1.1 client connections: framing, keep-alive and connection state. Each parsed request
 * goes to the front-end core (server/front.c), which answers it or starts the proxy; the
 * response comes back through the ops below. A TLS connection whose ALPN chose h2 is handed
 * to server/h2conn.c. */
#include "front.h"
#include "h2conn.h"
#include "worker.h"

#include "moat/log.h"
#include "moat/tls.h"

#include <stdlib.h>

#define MAX_REQUEST_HEADERS MOAT_HTTP1_MAX_HEADERS
/* After an error response the connection stays open this long reading and discarding, so
 * the client reads the response instead of a reset. */
#define LINGER_MS 2000

typedef enum {
    ST_IDLE,   /* between requests */
    ST_HEAD,   /* part of a request head has arrived */
    ST_BODY,   /* proxying, request body still arriving */
    ST_WAIT,   /* proxying, request body done: waiting for the response to end */
    ST_TUNNEL, /* after 101: raw bytes both ways */
    ST_LINGER, /* response sent, discarding input until the peer closes */
} conn_state_t;

/* Re-entrancy: a connection is freed only when both its handles have closed (refs counts
 * them), which always happens on a later loop turn; conn_close() inside a callback only
 * marks it closing. */
struct moat_conn {
    moat_sock_t sock;
    uv_timer_t timer;
    int refs;
    moat_worker_t *w;
    moat_conn_t *next, *prev;
    union {
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } peer; /* TCP peers only (sockaddr_storage would be 100 bytes more per connection) */
    int port;
    int tls;
    conn_state_t state;
    size_t scan;            /* how far moat_http1_head_end has looked */
    moat_front_t *front;    /* the request in progress (from take_front), NULL between requests */
    moat_http1_body_t body; /* the request body's framing */
    uint64_t keepalive_ms, header_ms;
    uint64_t in_start, out_start; /* socket byte counters when the request began */
    unsigned keep_alive : 1;
    unsigned http10 : 1;
    unsigned resp_chunked : 1;
    unsigned body_done : 1;
    unsigned closing : 1;
    unsigned in_process : 1;
    unsigned paused : 1;
    unsigned client_eof : 1;
    unsigned head_pending : 1; /* scratch holds a response head not yet written */
    unsigned line_checked : 1; /* the request line of the head in progress was judged */
    unsigned handshaken : 1;   /* TLS: the handshake ended (counted either way) */
    unsigned mkind : 2;        /* what it counts as in w->metrics->conns (MOAT_MC_H1/H2) */
    moat_buf_t scratch;        /* response head being serialized */
    moat_h2conn_t *h2;         /* set when ALPN chose h2: every socket event goes there */
};

static const moat_sock_cb_t conn_cb;
static const moat_front_ops_t front_ops;
static void process(moat_conn_t *c);

/* ---- the request's core state ----
 *
 * moat_front_t is ~1.4 KiB (the method, host and path kept for the access log) and a
 * connection needs it only while a request is in progress: an idle keep-alive connection, or
 * one that went over to HTTP/2, holds none. A small per-thread cache keeps a busy worker off
 * malloc for it. */
#define FRONT_CACHE_MAX 32
static _Thread_local moat_front_t *front_cache[FRONT_CACHE_MAX];
static _Thread_local int fronts_cached;

/* The front for a request starting now; 0, or MOAT_ENOMEM. */
static int take_front(moat_conn_t *c)
{
    if (c->front != NULL)
        return 0;
    moat_front_t *f = fronts_cached > 0 ? front_cache[--fronts_cached] : malloc(sizeof *f);
    if (f == NULL)
        return MOAT_ENOMEM;
    moat_front_init(f, c->w, &front_ops, c, (const struct sockaddr *)&c->peer, c->port, c->tls);
    c->front = f;
    return 0;
}

/* The request is over (finished, answered or abandoned): abort what still runs (a no-op after
 * moat_front_finish) and give the memory back. */
static void front_over(moat_conn_t *c)
{
    moat_front_t *f = c->front;
    if (f == NULL)
        return;
    moat_front_abort(f);
    c->front = NULL;
    if (fronts_cached < FRONT_CACHE_MAX)
        front_cache[fronts_cached++] = f;
    else
        free(f);
}

void moat_conn_thread_cleanup(void)
{
    while (fronts_cached > 0)
        free(front_cache[--fronts_cached]);
}

/* The running exchange, or NULL. */
static moat_exchange_t *exchange(const moat_conn_t *c)
{
    return c->front != NULL ? c->front->x : NULL;
}

/* ---- lifetime ---- */

static void conn_release(moat_conn_t *c)
{
    if (--c->refs > 0)
        return;
    moat_worker_t *w = c->w;
    if (w->metrics)
        moat_mc_dec(&w->metrics->conns[c->mkind]);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    moat_buf_free(&c->scratch);
    free(c);
}

static void timer_closed(uv_handle_t *h)
{
    conn_release(h->data);
}

static void conn_on_sock_close(moat_sock_t *s)
{
    conn_release(s->data);
}

static void conn_close(moat_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->tls && !c->handshaken && c->w->metrics) {
        /* Closed before its handshake ended: the header timeout, or the client went away. */
        c->handshaken = 1;
        moat_mc_inc(&c->w->metrics->tls_failed[MOAT_MT_TIMEOUT]);
    }
    if (c->h2 != NULL) {
        moat_h2conn_free(c->h2);
        c->h2 = NULL;
    }
    front_over(c);
    uv_close((uv_handle_t *)&c->timer, timer_closed);
    moat_sock_close(&c->sock);
}

static void timer_fired(uv_timer_t *t)
{
    moat_conn_t *c = t->data;
    if (c->state == ST_IDLE || c->state == ST_HEAD || c->state == ST_LINGER)
        conn_close(c);
}

static void set_timer(moat_conn_t *c, uint64_t ms)
{
    if (ms)
        uv_timer_start(&c->timer, timer_fired, ms, 0);
    else
        uv_timer_stop(&c->timer);
}

/* Send what is queued, then half-close and discard input for a moment before closing. */
static void linger_close(moat_conn_t *c)
{
    if (c->closing)
        return;
    front_over(c);
    c->state = ST_LINGER;
    moat_sock_shutdown_after_flush(&c->sock);
    moat_sock_read_start(&c->sock);
    set_timer(c, LINGER_MS);
}

/* ---- the front-end ops (the proxy and the core call them) ---- */

/* The response head is held back (c->head_pending) until the first body bytes, the end of
 * the response, or the end of the upstream event (fo_flush), so that a small response leaves
 * as one TLS record and one write, while a streamed one still gets its head at once. */
static int fo_send_head(void *front, int status, const moat_header_t *h, size_t n,
                        int64_t content_length, int has_body)
{
    moat_conn_t *c = front;
    moat_front_t *f = c->front;
    moat_buf_t *b = &c->scratch;
    moat_buf_reset(b);
    f->responded = 1;
    const char *reason = moat_http_reason(status);
    int r = moat_buf_append(b, "HTTP/1.1 ", 9);
    r |= moat_buf_put_u64(b, (uint64_t)status);
    r |= moat_buf_append(b, " ", 1);
    r |= moat_buf_append(b, reason, strlen(reason));
    r |= moat_buf_append(b, "\r\n", 2);
    for (size_t i = 0; i < n; i++) {
        r |= moat_buf_append(b, h[i].name.base, h[i].name.len);
        r |= moat_buf_append(b, ": ", 2);
        r |= moat_buf_append(b, h[i].value.base, h[i].value.len);
        r |= moat_buf_append(b, "\r\n", 2);
    }
    c->resp_chunked = 0;
    /* moat's own error answers, and any answer that leaves the request body unread, end the
     * connection: what follows on it cannot be trusted to be the next request. */
    if (c->w->draining || f->body_unread || (f->x == NULL && status >= 400))
        c->keep_alive = 0;
    if (status == 101) {
        r |= moat_buf_append(b, "Connection: upgrade\r\n", 21);
    } else if (content_length >= 0 && (has_body || f->head_req)) {
        r |= moat_buf_append(b, "Content-Length: ", 16);
        r |= moat_buf_put_u64(b, (uint64_t)content_length);
        r |= moat_buf_append(b, "\r\n", 2);
    } else if (has_body && !c->http10) {
        r |= moat_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
        c->resp_chunked = 1;
    } else if (has_body) {
        c->keep_alive = 0; /* HTTP/1.0 without a length: the close ends the body */
    } else if (!f->head_req && status >= 200 && status != 204 && status != 304) {
        r |= moat_buf_append(b, "Content-Length: 0\r\n", 19);
    }
    if (!c->keep_alive && status != 101)
        r |= moat_buf_append(b, "Connection: close\r\n", 19);
    else if (c->http10 && status != 101)
        r |= moat_buf_puts(b, "Connection: keep-alive\r\n"); /* RFC 9112 §9.3 for 1.0 */
    r |= moat_buf_append(b, "\r\n", 2);
    if (r)
        return MOAT_ENOMEM;
    c->head_pending = 1;
    return 0;
}

/* Write v[0..n) preceded by the held-back head, if any, in one writev. */
static int write_with_head(moat_conn_t *c, const moat_slice_t *v, size_t n)
{
    moat_slice_t all[4];
    size_t k = 0;
    if (c->head_pending) {
        c->head_pending = 0;
        all[k++] = moat_slice(moat_buf_data(&c->scratch), moat_buf_size(&c->scratch));
    }
    for (size_t i = 0; i < n && k < MOAT_ARRAY_LEN(all); i++)
        all[k++] = v[i];
    return k ? moat_sock_writev(&c->sock, all, k) : 0;
}

static void fo_flush(void *front)
{
    moat_conn_t *c = front;
    if (c->head_pending)
        write_with_head(c, NULL, 0);
}

static int fo_send_data(void *front, moat_slice_t data)
{
    moat_conn_t *c = front;
    if (c->front->head_req || data.len == 0)
        return 0;
    if (c->resp_chunked) {
        char prefix[MOAT_HTTP1_CHUNK_PREFIX_MAX];
        moat_slice_t v[3] = {moat_slice(prefix, moat_http1_chunk_prefix(prefix, data.len)), data,
                             MOAT_SLICE_LIT("\r\n")};
        return write_with_head(c, v, 3);
    }
    return write_with_head(c, &data, 1);
}

static int fo_send_end(void *front)
{
    moat_conn_t *c = front;
    if (c->state == ST_TUNNEL) {
        moat_sock_shutdown_after_flush(&c->sock);
        return 0;
    }
    if (c->resp_chunked && !c->front->head_req) {
        moat_slice_t end = MOAT_SLICE_LIT("0\r\n\r\n");
        return write_with_head(c, &end, 1);
    }
    return write_with_head(c, NULL, 0);
}

static void fo_send_continue(void *front)
{
    moat_conn_t *c = front;
    moat_sock_write(&c->sock, "HTTP/1.1 100 Continue\r\n\r\n", 25);
}

static size_t fo_queued(void *front)
{
    moat_conn_t *c = front;
    return moat_sock_queued(&c->sock) + (c->head_pending ? moat_buf_size(&c->scratch) : 0);
}

static void fo_counts(void *front, uint64_t *in, uint64_t *out)
{
    moat_conn_t *c = front;
    *in = c->sock.bytes_read - c->in_start;
    *out = c->sock.bytes_written + fo_queued(c) - c->out_start;
}

/* Read what already arrived, unless this is a nested call from inside process(). */
static void resume_input(moat_conn_t *c)
{
    moat_sock_read_start(&c->sock);
    if (!c->in_process && !c->closing && moat_sock_input(&c->sock).len > 0)
        process(c);
}

static void fo_pause_body(void *front, int pause)
{
    moat_conn_t *c = front;
    c->paused = pause != 0;
    if (pause)
        moat_sock_read_stop(&c->sock);
    else if (c->state == ST_BODY || c->state == ST_TUNNEL)
        resume_input(c);
}

static void fo_upgraded(void *front)
{
    moat_conn_t *c = front;
    fo_flush(c);
    c->state = ST_TUNNEL;
    c->body_done = 1;
    set_timer(c, 0);
    resume_input(c);
}

static void fo_done(void *front, int err, const moat_exchange_result_t *res)
{
    moat_conn_t *c = front;
    int was_tunnel = c->state == ST_TUNNEL;
    fo_flush(c);
    moat_front_finish(c->front, res);
    front_over(c);
    if (err != 0 || was_tunnel) {
        /* The response was cut: the client must see the connection end, not a short body
         * that looks whole. */
        conn_close(c);
        return;
    }
    if (!c->body_done || !c->keep_alive || c->client_eof || c->w->draining) {
        linger_close(c);
        return;
    }
    c->state = ST_IDLE;
    c->scan = 0;
    set_timer(c, c->keepalive_ms);
    resume_input(c);
}

static const moat_front_ops_t front_ops = {
    .send_head = fo_send_head,
    .send_data = fo_send_data,
    .send_end = fo_send_end,
    .send_continue = fo_send_continue,
    .queued = fo_queued,
    .pause_body = fo_pause_body,
    .upgraded = fo_upgraded,
    .flush = fo_flush,
    .counts = fo_counts,
    .done = fo_done,
};

/* ---- request handling ---- */

/* The request is over without an exchange (moat answered it): keep the connection for the
 * next request, or end it as the answer said. */
static void after_answer(moat_conn_t *c)
{
    front_over(c);
    if (c->closing || c->state == ST_LINGER)
        return;
    if (!c->keep_alive) {
        linger_close(c);
        return;
    }
    c->state = ST_IDLE;
    c->scan = 0;
    set_timer(c, c->keepalive_ms);
}

static void mark_start(moat_conn_t *c)
{
    c->in_start = c->sock.bytes_read - moat_sock_input(&c->sock).len;
    c->out_start = c->sock.bytes_written + moat_sock_queued(&c->sock);
}

/* A complete head is at the start of the input: hand it to the core. */
static void start_request(moat_conn_t *c, size_t head_len, moat_http1_msg_t *m)
{
    mark_start(c);
    c->http10 = m->minor_version == 0;
    c->keep_alive = m->keep_alive;
    set_timer(c, 0);
    moat_front_req_t req = {
        .method = m->method,
        .target = moat_http1_origin_form(m->target), /* absolute-form goes upstream as origin */
        .authority = m->host,
        .headers = m->headers,
        .nheaders = m->nheaders,
        .h1 = m,
        .content_length = m->content_length,
        .upgrade = m->upgrade,
        .expect_continue = m->expect_continue,
        .proto = c->http10 ? "HTTP/1.0" : "HTTP/1.1",
    };
    if (m->body == MOAT_BODY_CHUNKED)
        req.body = MOAT_REQ_BODY_STREAM;
    else if (m->body == MOAT_BODY_LENGTH && m->content_length > 0)
        req.body = MOAT_REQ_BODY_LENGTH;
    else
        req.body = MOAT_REQ_BODY_NONE;
    moat_http1_body_init(&c->body, req.body == MOAT_REQ_BODY_NONE ? MOAT_BODY_NONE : m->body,
                         m->content_length);
    c->body_done = req.body == MOAT_REQ_BODY_NONE;
    if (take_front(c) != 0) {
        conn_close(c);
        return;
    }
    moat_front_result_t res = moat_front_start(c->front, &req);
    /* Consume the head only now: the request's slices point into it. */
    if (!c->closing)
        moat_sock_consume(&c->sock, head_len);
    if (res == MOAT_FRONT_ANSWERED) {
        after_answer(c);
        return;
    }
    if (c->front == NULL)
        return; /* closed from inside the start */
    c->keepalive_ms = c->front->site->site->keepalive_timeout_ms;
    c->state = c->body_done ? ST_WAIT : ST_BODY;
}

static int feed_body(moat_conn_t *c)
{
    moat_slice_t in = moat_sock_input(&c->sock);
    while (in.len > 0 && !c->body_done && exchange(c) != NULL && !c->paused) {
        moat_slice_t data;
        size_t used;
        int r = moat_http1_body_read(&c->body, in.base, in.len, &used, &data);
        if (r < 0) {
            moat_front_refuse_body(c->front, 400);
            linger_close(c);
            return -1;
        }
        if (r == 1)
            c->body_done = 1;
        moat_sock_consume(&c->sock, used);
        if (data.len) {
            int e = moat_front_body(c->front, data);
            if (e == MOAT_ETOO_LARGE) {
                linger_close(c);
                return -1;
            }
            if (e != 0) {
                conn_close(c);
                return -1;
            }
        }
        in = moat_sock_input(&c->sock);
    }
    if (c->body_done && exchange(c) != NULL && c->state == ST_BODY) {
        c->state = ST_WAIT;
        moat_front_body_end(c->front);
    }
    return 0;
}

static void process(moat_conn_t *c)
{
    c->in_process = 1;
    while (!c->closing) {
        moat_slice_t in = moat_sock_input(&c->sock);
        if (c->state == ST_IDLE || c->state == ST_HEAD) {
            if (in.len == 0)
                break;
            if (c->state == ST_IDLE) {
                c->state = ST_HEAD;
                set_timer(c, c->header_ms);
            }
            size_t end = moat_http1_head_end(in.base, in.len, &c->scan);
            /* Wait for the whole head (the scan is resumable, so this is linear); parse an
             * incomplete one only once it is too big, to answer 414 or 431. */
            if (end == 0 && in.len <= MOAT_HTTP1_MAX_HEAD) {
                /* A complete request line is judged at once: an HTTP/0.9 "GET /" has no head
                 * to wait for, and must not hold the connection until the header timeout. */
                const char *nl = c->line_checked ? NULL : memchr(in.base, '\n', in.len);
                if (nl == NULL)
                    break;
                c->line_checked = 1;
                int status = 400;
                moat_header_t none[1];
                moat_http1_msg_t m;
                size_t line_len = (size_t)(nl - in.base) + 1;
                if (moat_http1_parse_request(in.base, line_len, &m, none, 1, &status) !=
                    MOAT_EPARSE)
                    break;
                mark_start(c);
                c->keep_alive = 0;
                if (take_front(c) == 0)
                    moat_front_reject(c->front, status, "HTTP/1.1");
                linger_close(c);
                break;
            }
            int status = 400;
            moat_header_t headers[MAX_REQUEST_HEADERS];
            moat_http1_msg_t m;
            int r = moat_http1_parse_request(in.base, end ? end : in.len, &m, headers,
                                             MAX_REQUEST_HEADERS, &status);
            if (r < 0) {
                mark_start(c);
                c->keep_alive = 0;
                if (take_front(c) == 0)
                    moat_front_reject(c->front, r == MOAT_ENEED_MORE ? 431 : status, "HTTP/1.1");
                linger_close(c);
                break;
            }
            c->scan = 0;
            c->line_checked = 0;
            start_request(c, (size_t)r, &m);
            continue;
        }
        if (c->state == ST_BODY) {
            if (in.len == 0 || c->paused)
                break;
            if (feed_body(c) != 0)
                break;
            if (c->state == ST_BODY)
                break;
            continue;
        }
        if (c->state == ST_WAIT) {
            /* Pipelined bytes wait until the response in flight is done. */
            moat_sock_read_stop(&c->sock);
            break;
        }
        if (c->state == ST_TUNNEL) {
            if (in.len == 0 || exchange(c) == NULL)
                break;
            int r = moat_proxy_tunnel_write(exchange(c), in);
            moat_sock_consume(&c->sock, in.len);
            if (r != 0) {
                conn_close(c);
                break;
            }
            continue;
        }
        if (c->state == ST_LINGER) {
            moat_sock_consume(&c->sock, in.len);
            break;
        }
    }
    c->in_process = 0;
}

/* ---- socket callbacks ---- */

static void on_read(moat_sock_t *s)
{
    moat_conn_t *c = s->data;
    if (c->h2 != NULL) {
        moat_h2conn_on_read(c->h2);
        return;
    }
    if (!c->in_process)
        process(c);
}

static void on_eof(moat_sock_t *s, int err)
{
    moat_conn_t *c = s->data;
    c->client_eof = 1;
    if (c->h2 != NULL) {
        moat_h2conn_on_eof(c->h2, err);
        return;
    }
    if (c->state == ST_TUNNEL)
        MOAT_DEBUG("websocket: the client's side ended (%s)", err ? moat_strerror(err) : "closed");
    if (c->state == ST_TUNNEL && err == 0 && exchange(c) != NULL) {
        moat_proxy_tunnel_client_eof(exchange(c));
        return;
    }
    if (c->state == ST_WAIT && err == 0 && exchange(c) != NULL)
        return; /* a half-close after a whole request: still deliver the response */
    conn_close(c);
}

static void on_drain(moat_sock_t *s)
{
    moat_conn_t *c = s->data;
    if (c->h2 != NULL) {
        moat_h2conn_on_drain(c->h2);
        return;
    }
    if (exchange(c) != NULL)
        moat_proxy_front_drained(exchange(c));
    else if (c->state == ST_LINGER && c->client_eof)
        conn_close(c);
}

static void h2_close(void *owner)
{
    conn_close(owner);
}

static const moat_h2conn_owner_t h2_owner = {.close = h2_close};

static void on_connect(moat_sock_t *s, int err)
{
    moat_conn_t *c = s->data;
    moat_metrics_t *m = c->w->metrics;
    if (m != NULL && !c->handshaken) {
        c->handshaken = 1;
        if (err != 0)
            moat_mc_inc(&m->tls_failed[moat_tls_refused_sni(c->sock.ssl) ? MOAT_MT_UNKNOWN_SNI
                                                                         : MOAT_MT_PROTOCOL]);
        else
            moat_mc_inc(SSL_session_reused(c->sock.ssl) ? &m->tls_resumed : &m->tls_full);
    }
    if (err != 0) {
        conn_close(c);
        return;
    }
    const char *alpn = moat_tls_selected_alpn(c->sock.ssl);
    if (alpn != NULL && strcmp(alpn, "h2") == 0) {
        if (m != NULL) {
            moat_mc_dec(&m->conns[MOAT_MC_H1]);
            moat_mc_inc(&m->conns[MOAT_MC_H2]);
        }
        c->mkind = MOAT_MC_H2;
        c->h2 = moat_h2conn_new(c->w, &c->sock, (const struct sockaddr *)&c->peer, c->port,
                                &h2_owner, c);
        if (c->h2 == NULL) {
            conn_close(c);
            return;
        }
        set_timer(c, 0); /* the HTTP/2 connection keeps its own timers */
        moat_sock_read_start(&c->sock);
        /* The client's first bytes, and our SETTINGS. read_start may have delivered bytes
         * already (they came with the handshake), and a bad preface among them closed the
         * connection: c->h2 is NULL then (c itself lives until the handles' close). */
        if (c->h2 != NULL)
            moat_h2conn_on_read(c->h2);
        return;
    }
    moat_sock_read_start(&c->sock);
}

static const moat_sock_cb_t conn_cb = {
    .on_read = on_read,
    .on_eof = on_eof,
    .on_drain = on_drain,
    .on_connect = on_connect,
    .on_close = conn_on_sock_close,
};

void moat_conn_accept(moat_worker_t *w, int fd, const struct sockaddr *peer, int port, int tls)
{
    SSL *ssl = NULL;
    if (tls) {
        ssl = SSL_new(w->opts->tls);
        if (ssl == NULL) {
            close(fd);
            return;
        }
        /* The connection's copy of the certificate, cipher and ALPN configuration is only
         * needed during the handshake; BoringSSL frees it then (an idle connection is
         * smaller by it). moat never renegotiates or asks for that configuration later. */
        SSL_set_shed_handshake_config(ssl, 1);
    }
    moat_conn_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        if (ssl)
            SSL_free(ssl);
        close(fd);
        return;
    }
    c->w = w;
    c->port = port;
    c->tls = tls;
    moat_runtime_t *rt = moat_worker_runtime_acquire(w);
    c->header_ms = rt ? rt->header_timeout_ms : 30000;
    c->keepalive_ms = rt ? rt->keepalive_timeout_ms : 300000;
    moat_worker_runtime_release(w, rt);
    memcpy(&c->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    if (moat_sock_init(&c->sock, &w->loop, fd, ssl, &conn_cb, c) != 0) {
        free(c); /* nothing of it is on the loop (moat_sock_init's contract) */
        return;
    }
    uv_timer_init(&w->loop, &c->timer);
    c->timer.data = c;
    c->refs = 2;
    c->mkind = MOAT_MC_H1;
    if (w->metrics)
        moat_mc_inc(&w->metrics->conns[MOAT_MC_H1]);
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    c->state = ST_IDLE;
    /* The handshake and the first request head must come within the header timeout. */
    set_timer(c, c->header_ms);
    if (!tls)
        moat_sock_read_start(&c->sock);
}

void moat_conn_drain_all(moat_worker_t *w)
{
    moat_conn_t *next;
    for (moat_conn_t *c = w->conns; c != NULL; c = next) {
        next = c->next;
        if (c->h2 != NULL)
            moat_h2conn_shutdown(c->h2);
        else if (c->state == ST_IDLE && moat_sock_input(&c->sock).len == 0)
            conn_close(c);
    }
}

void moat_conn_close_all(moat_worker_t *w)
{
    moat_conn_t *next;
    for (moat_conn_t *c = w->conns; c != NULL; c = next) {
        next = c->next;
        conn_close(c);
    }
}
