/* HTTP/1.1 client connections: the front end that parses requests (server/http1.c), answers
 * redirects and errors itself, and hands everything else to the proxy (server/proxy.c). */
#include "moat/acme.h"
#include "h2conn.h"
#include "moat/log.h"
#include "moat/proxy.h"
#include "moat/runtime.h"
#include "moat/tls.h"
#include "worker.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

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

struct moat_conn {
    moat_sock_t sock;
    uv_timer_t timer;
    int open_handles;
    moat_worker_t *w;
    moat_conn_t *next, *prev;
    struct sockaddr_storage peer;
    int port;
    int tls;
    conn_state_t state;
    size_t scan; /* how far moat_http1_head_end has looked */
    moat_exchange_t *x;
    moat_runtime_t *rt;
    const moat_site_t *site;
    moat_http1_chunked_t dec;
    moat_req_body_t body;
    uint64_t body_left, body_seen, max_body;
    uint64_t keepalive_ms, header_ms;
    unsigned keep_alive : 1;
    unsigned http10 : 1;
    unsigned head_req : 1;
    unsigned resp_chunked : 1;
    unsigned body_done : 1;
    unsigned closing : 1;
    unsigned in_process : 1;
    unsigned paused : 1;
    unsigned client_eof : 1;
    unsigned head_pending : 1; /* scratch holds a response head not yet written */
    /* access log */
    uint64_t t_start, in_start, out_start;
    int status;
    char method[16];
    char host[256];
    char path[1024];
    /* The client as a trusted proxy's X-Forwarded-For names it, or "". */
    char remote[INET6_ADDRSTRLEN + 1];
    moat_buf_t scratch; /* response head being serialized */
    moat_h2conn_t *h2;  /* set when ALPN chose h2: every socket event goes there */
};

static const moat_sock_cb_t conn_cb;
static const moat_front_ops_t front_ops;
static void process(moat_conn_t *c);

/* ---- lifetime ---- */

static void conn_release(moat_conn_t *c)
{
    if (--c->open_handles > 0)
        return;
    moat_worker_t *w = c->w;
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

static void end_request(moat_conn_t *c)
{
    if (c->rt != NULL) {
        moat_runtime_release(c->rt);
        c->rt = NULL;
        c->site = NULL;
    }
}

static void conn_close(moat_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->h2 != NULL) {
        moat_h2conn_free(c->h2);
        c->h2 = NULL;
    }
    if (c->x != NULL) {
        moat_proxy_abort(c->x);
        c->x = NULL;
    }
    end_request(c);
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
    if (c->x != NULL) {
        moat_proxy_abort(c->x);
        c->x = NULL;
    }
    end_request(c);
    c->state = ST_LINGER;
    moat_sock_shutdown_after_flush(&c->sock);
    moat_sock_read_start(&c->sock);
    set_timer(c, LINGER_MS);
}

/* ---- access log ---- */

static void access_log(moat_conn_t *c, const char *upstream, uint64_t upstream_ms)
{
    moat_access_entry_t e = {
        .peer = (const struct sockaddr *)&c->peer,
        .remote = c->remote,
        .host = c->host,
        .method = c->method,
        .path = c->path,
        .proto = c->http10 ? "HTTP/1.0" : "HTTP/1.1",
        .tls = c->tls,
        .status = c->status,
        .bytes_in = c->sock.bytes_read - c->in_start,
        .bytes_out = c->sock.bytes_written + moat_sock_queued(&c->sock) - c->out_start,
        .duration_ms = uv_now(&c->w->loop) - c->t_start,
        .upstream = upstream,
        .upstream_ms = upstream_ms,
    };
    moat_access_log_request(&e);
}

/* ---- responses moat writes itself ---- */

static const char *reason_phrase(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
    }
}

/* An error page, then the connection ends (the request was not understood, or its body
 * will not be read). */
static void respond_error_and_close(moat_conn_t *c, int status)
{
    const char *reason, *body;
    moat_proxy_error_page(status, &reason, &body);
    char head[256];
    size_t blen = strlen(body);
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/html; charset=utf-8\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                     status, reason, blen);
    moat_slice_t v[2] = {moat_slice(head, (size_t)n), moat_slice(body, c->head_req ? 0 : blen)};
    c->status = status;
    moat_sock_writev(&c->sock, v, 2);
    access_log(c, "", 0);
    linger_close(c);
}

/* 308 to the HTTPS address of the site: its canonical name, its port when not 443, and the
 * request's path and query. */
static void respond_redirect(moat_conn_t *c, const moat_runtime_t *rt, const moat_site_addr_t *a,
                             moat_slice_t target)
{
    int https_port = moat_runtime_addr_port(rt, a);
    int v6 = a->kind == MOAT_HOST_IPV6;
    target = moat_http1_origin_form(target);
    char port[16] = "";
    if (https_port != 443)
        snprintf(port, sizeof port, ":%d", https_port);
    moat_buf_reset(&c->scratch);
    moat_buf_appendf(&c->scratch,
                     "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://%s%s%s%s%.*s\r\n"
                     "Content-Length: 0\r\n%s\r\n",
                     v6 ? "[" : "", a->host, v6 ? "]" : "", port, (int)target.len, target.base,
                     c->keep_alive ? "" : "Connection: close\r\n");
    c->status = 308;
    moat_sock_write(&c->sock, moat_buf_data(&c->scratch), moat_buf_size(&c->scratch));
}

/* ---- the front-end ops the proxy calls ---- */

/* The response head is held back (c->head_pending) until the first body bytes, the end of
 * the response, or the end of the upstream event (fo_flush), so that a small response leaves
 * as one TLS record and one write, while a streamed one still gets its head at once. */
static int fo_send_head(void *front, int status, const moat_header_t *h, size_t n,
                        int64_t content_length, int has_body)
{
    moat_conn_t *c = front;
    moat_buf_t *b = &c->scratch;
    moat_buf_reset(b);
    c->status = status;
    const char *reason = reason_phrase(status);
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
    if (c->w->draining)
        c->keep_alive = 0;
    if (status == 101) {
        r |= moat_buf_append(b, "Connection: upgrade\r\n", 21);
    } else if (content_length >= 0 && (has_body || c->head_req)) {
        r |= moat_buf_append(b, "Content-Length: ", 16);
        r |= moat_buf_put_u64(b, (uint64_t)content_length);
        r |= moat_buf_append(b, "\r\n", 2);
    } else if (has_body && !c->http10) {
        r |= moat_buf_append(b, "Transfer-Encoding: chunked\r\n", 28);
        c->resp_chunked = 1;
    } else if (has_body) {
        c->keep_alive = 0; /* HTTP/1.0 without a length: the close ends the body */
    } else if (!c->head_req && status >= 200 && status != 204 && status != 304) {
        r |= moat_buf_append(b, "Content-Length: 0\r\n", 19);
    }
    if (!c->keep_alive && status != 101)
        r |= moat_buf_append(b, "Connection: close\r\n", 19);
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
    if (c->head_req || data.len == 0)
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
    if (c->resp_chunked && !c->head_req) {
        moat_slice_t end = MOAT_SLICE_LIT("0\r\n\r\n");
        return write_with_head(c, &end, 1);
    }
    return write_with_head(c, NULL, 0);
}

static size_t fo_queued(void *front)
{
    moat_conn_t *c = front;
    return moat_sock_queued(&c->sock) + (c->head_pending ? moat_buf_size(&c->scratch) : 0);
}

static void fo_pause_body(void *front, int pause)
{
    moat_conn_t *c = front;
    c->paused = pause != 0;
    if (pause) {
        moat_sock_read_stop(&c->sock);
    } else if (c->state == ST_BODY || c->state == ST_TUNNEL) {
        moat_sock_read_start(&c->sock);
        if (!c->in_process && moat_sock_input(&c->sock).len > 0)
            process(c);
    }
}

static void fo_upgraded(void *front)
{
    moat_conn_t *c = front;
    fo_flush(c);
    c->state = ST_TUNNEL;
    c->body_done = 1;
    set_timer(c, 0);
    moat_sock_read_start(&c->sock);
    if (!c->in_process && moat_sock_input(&c->sock).len > 0)
        process(c);
}

static void fo_done(void *front, int err, const moat_exchange_result_t *res)
{
    moat_conn_t *c = front;
    int was_tunnel = c->state == ST_TUNNEL;
    fo_flush(c);
    c->x = NULL;
    if (res->status)
        c->status = res->status;
    access_log(c, res->upstream, res->upstream_ms);
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
    end_request(c);
    c->state = ST_IDLE;
    c->scan = 0;
    set_timer(c, c->keepalive_ms);
    moat_sock_read_start(&c->sock);
    if (!c->in_process && moat_sock_input(&c->sock).len > 0)
        process(c);
}

static const moat_front_ops_t front_ops = {
    .send_head = fo_send_head,
    .send_data = fo_send_data,
    .send_end = fo_send_end,
    .queued = fo_queued,
    .pause_body = fo_pause_body,
    .upgraded = fo_upgraded,
    .flush = fo_flush,
    .done = fo_done,
};

/* ---- request handling ---- */

static void copy_field(char *dst, size_t cap, moat_slice_t s)
{
    size_t n = MOAT_MIN(s.len, cap - 1);
    memcpy(dst, s.base, n);
    dst[n] = 0;
}

/* Behind a trusted proxy (trusted_proxies=) the client is the last X-Forwarded-For hop, the
 * one that proxy added; logs show it instead of the proxy. Only a valid IP is taken. */
static void trusted_remote(moat_conn_t *c, const moat_http1_msg_t *m)
{
    int trusted = 0;
    for (size_t i = 0; i < c->site->ntrusted && !trusted; i++)
        trusted = moat_cidr_match(&c->site->trusted[i], (const struct sockaddr *)&c->peer);
    moat_slice_t xff = {0};
    for (size_t i = 0; trusted && i < m->nheaders; i++)
        if (moat_slice_ieq(m->headers[i].name, "x-forwarded-for"))
            xff = m->headers[i].value; /* the last field carries the last hop */
    if (xff.len == 0)
        return;
    const char *end = xff.base + xff.len, *p = end;
    while (p > xff.base && p[-1] != ',')
        p--;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    char ip[INET6_ADDRSTRLEN + 1];
    unsigned char bin[sizeof(struct in6_addr)];
    size_t n = (size_t)(end - p);
    if (n == 0 || n >= sizeof ip)
        return;
    memcpy(ip, p, n);
    ip[n] = 0;
    if (inet_pton(AF_INET, ip, bin) == 1 || inet_pton(AF_INET6, ip, bin) == 1)
        memcpy(c->remote, ip, n + 1);
}

/* A complete head is at the start of the input: answer it or start proxying it. */
static void start_request(moat_conn_t *c, size_t head_len, moat_http1_msg_t *m)
{
    c->t_start = uv_now(&c->w->loop);
    c->in_start = c->sock.bytes_read - moat_sock_input(&c->sock).len;
    c->out_start = c->sock.bytes_written + moat_sock_queued(&c->sock);
    c->http10 = m->minor_version == 0;
    c->keep_alive = m->keep_alive;
    c->head_req = moat_slice_eq(m->method, "HEAD");
    c->status = 0;
    c->remote[0] = 0;
    copy_field(c->method, sizeof c->method, m->method);
    copy_field(c->host, sizeof c->host, m->host);
    copy_field(c->path, sizeof c->path, m->target);
    set_timer(c, 0);

    if (m->host.len == 0) {
        respond_error_and_close(c, 400);
        return;
    }
    c->rt = moat_runtime_acquire();
    const moat_site_rt_t *site = moat_runtime_find_site(c->rt, m->host, c->port, c->tls);
    if (site == NULL && !c->tls) {
        static const char acme_prefix[] = "/.well-known/acme-challenge/";
        if (m->target.len >= sizeof acme_prefix - 1 &&
            memcmp(m->target.base, acme_prefix, sizeof acme_prefix - 1) == 0) {
            /* ACME HTTP-01, answered before any redirect: the token table is tiny and
             * read under a mutex (acme/challenge.c). */
            const char *tok = m->target.base + sizeof acme_prefix - 1;
            size_t tlen = m->target.len - (sizeof acme_prefix - 1);
            const char *q = memchr(tok, '?', tlen);
            char ka[512];
            int kl = moat_acme_http01_get(tok, q ? (size_t)(q - tok) : tlen, ka, sizeof ka);
            moat_sock_consume(&c->sock, head_len);
            end_request(c);
            if (kl < 0) {
                respond_error_and_close(c, 404);
                return;
            }
            char head[160];
            int hn = snprintf(head, sizeof head,
                              "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              "Content-Length: %d\r\nConnection: close\r\n\r\n",
                              kl);
            moat_slice_t v[2] = {moat_slice(head, (size_t)hn),
                                 moat_slice(ka, c->head_req ? 0 : (size_t)kl)};
            c->status = 200;
            moat_sock_writev(&c->sock, v, 2);
            access_log(c, "", 0);
            linger_close(c);
            return;
        }
        const moat_site_addr_t *tls_addr = moat_runtime_find_tls_addr(c->rt, m->host);
        if (tls_addr != NULL) {
            respond_redirect(c, c->rt, tls_addr, m->target);
            moat_sock_consume(&c->sock, head_len);
            access_log(c, "", 0);
            end_request(c);
            /* A request body is not read: keep the connection only if there is none. */
            if (m->body != MOAT_BODY_NONE &&
                !(m->body == MOAT_BODY_LENGTH && m->content_length == 0))
                linger_close(c);
            else if (!c->keep_alive)
                linger_close(c);
            else
                c->state = ST_IDLE;
            return;
        }
    }
    if (site == NULL) {
        end_request(c);
        respond_error_and_close(c, 404);
        return;
    }
    c->site = site->site;
    c->keepalive_ms = site->site->keepalive_timeout_ms;
    c->max_body = site->site->max_body;
    trusted_remote(c, m);
    if (c->max_body && m->body == MOAT_BODY_LENGTH && m->content_length > c->max_body) {
        /* Refused before a byte of the body is read. */
        end_request(c);
        respond_error_and_close(c, 413);
        return;
    }
    moat_request_t req = {
        .method = m->method,
        .target = moat_http1_origin_form(m->target), /* absolute-form goes upstream as origin */
        .authority = m->host,
        .headers = m->headers,
        .nheaders = m->nheaders,
        .h1 = m,
        .content_length = m->content_length,
        .upgrade = m->upgrade,
        .tls = c->tls,
        .peer = (const struct sockaddr *)&c->peer,
    };
    c->body_seen = 0;
    switch (m->body) {
    case MOAT_BODY_LENGTH:
        req.body = m->content_length ? MOAT_REQ_BODY_LENGTH : MOAT_REQ_BODY_NONE;
        c->body_left = m->content_length;
        break;
    case MOAT_BODY_CHUNKED:
        req.body = MOAT_REQ_BODY_STREAM;
        moat_http1_chunked_init(&c->dec);
        break;
    default: req.body = MOAT_REQ_BODY_NONE;
    }
    c->body = req.body;
    c->body_done = req.body == MOAT_REQ_BODY_NONE;
    c->state = c->body_done ? ST_WAIT : ST_BODY;
    if (m->expect_continue && !c->body_done)
        moat_sock_write(&c->sock, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    moat_runtime_t *rt = c->rt;
    c->x = (moat_exchange_t *)1; /* the proxy may finish synchronously: see fo_done */
    moat_exchange_t *x = moat_proxy_start(c->w, rt, site, &req, &front_ops, c);
    /* Consume the head only now: the request's slices point into it. */
    if (!c->closing)
        moat_sock_consume(&c->sock, head_len);
    if (x == NULL) {
        c->x = NULL;
        return; /* fo_done already ran (the 502 page) */
    }
    if (c->x == (moat_exchange_t *)1)
        c->x = x;
}

static int feed_body(moat_conn_t *c)
{
    moat_slice_t in = moat_sock_input(&c->sock);
    while (in.len > 0 && !c->body_done && c->x != NULL && !c->paused) {
        moat_slice_t data;
        size_t used;
        if (c->body == MOAT_REQ_BODY_LENGTH) {
            used = (size_t)MOAT_MIN((uint64_t)in.len, c->body_left);
            data = moat_slice(in.base, used);
            c->body_left -= used;
            if (c->body_left == 0)
                c->body_done = 1;
        } else {
            int r = moat_http1_chunked_decode(&c->dec, in.base, in.len, &used, &data);
            if (r < 0) {
                respond_error_and_close(c, 400);
                return -1;
            }
            if (r == 1)
                c->body_done = 1;
        }
        c->body_seen += data.len;
        if (c->max_body && c->body_seen > c->max_body) {
            /* A streamed body passed max_body: the upstream gets a cut request (it sees the
             * connection end) and the client a 413 if nothing was answered yet. */
            moat_sock_consume(&c->sock, used);
            if (c->x != NULL) {
                moat_proxy_abort(c->x);
                c->x = NULL;
            }
            respond_error_and_close(c, 413);
            return -1;
        }
        moat_sock_consume(&c->sock, used);
        if (data.len && moat_proxy_body(c->x, data) != 0) {
            conn_close(c);
            return -1;
        }
        in = moat_sock_input(&c->sock);
    }
    if (c->body_done && c->x != NULL && c->state == ST_BODY) {
        c->state = ST_WAIT;
        moat_proxy_body_end(c->x);
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
            if (end == 0 && in.len <= MOAT_HTTP1_MAX_HEAD)
                break;
            int status = 400;
            moat_header_t headers[MAX_REQUEST_HEADERS];
            moat_http1_msg_t m;
            int r = moat_http1_parse_request(in.base, end ? end : in.len, &m, headers,
                                             MAX_REQUEST_HEADERS, &status);
            if (r == MOAT_ENEED_MORE) {
                respond_error_and_close(c, 431);
                break;
            }
            if (r < 0) {
                copy_field(c->method, sizeof c->method, MOAT_SLICE_LIT("-"));
                c->host[0] = c->path[0] = 0;
                respond_error_and_close(c, status);
                break;
            }
            c->scan = 0;
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
            if (in.len == 0 || c->x == NULL)
                break;
            int r = moat_proxy_tunnel_write(c->x, in);
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
    if (c->state == ST_TUNNEL && err == 0 && c->x != NULL) {
        moat_proxy_tunnel_client_eof(c->x);
        return;
    }
    if (c->state == ST_WAIT && err == 0 && c->x != NULL)
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
    if (c->x != NULL)
        moat_proxy_front_drained(c->x);
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
    if (err != 0) {
        conn_close(c);
        return;
    }
    const char *alpn = moat_tls_selected_alpn(c->sock.ssl);
    if (alpn != NULL && strcmp(alpn, "h2") == 0) {
        c->h2 = moat_h2conn_new(c->w, &c->sock, (const struct sockaddr *)&c->peer, c->port,
                                &h2_owner, c);
        if (c->h2 == NULL) {
            conn_close(c);
            return;
        }
        set_timer(c, 0); /* the HTTP/2 connection keeps its own timers */
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
    moat_runtime_t *rt = moat_runtime_acquire();
    c->header_ms = rt ? rt->header_timeout_ms : 30000;
    c->keepalive_ms = rt ? rt->keepalive_timeout_ms : 300000;
    moat_runtime_release(rt);
    memcpy(&c->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    if (moat_sock_init(&c->sock, &w->loop, fd, ssl, &conn_cb, c) != 0) {
        free(c);
        return;
    }
    uv_timer_init(&w->loop, &c->timer);
    c->timer.data = c;
    c->open_handles = 2;
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
