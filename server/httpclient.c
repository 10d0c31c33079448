/* The control-plane HTTP/1.1 client (include/moat/httpclient.h). One connection per request
 * with "Connection: close": ACME needs a dozen requests per certificate, and a fresh
 * connection keeps the state machine here trivial (no pool, no pipelining). */
#include "moat/httpclient.h"
#include "moat/http1.h"
#include "moat/log.h"
#include "moat/sock.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <unistd.h>
#include <uv.h>

#define SYSTEM_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

typedef struct req req_t;

struct moat_httpc {
    uv_loop_t *loop;
    SSL_CTX *ctx;
    uint64_t timeout_ms;
    req_t *reqs; /* in flight, doubly linked */
    int freeing;
};

struct req {
    moat_httpc_t *h;
    req_t *prev, *next;
    moat_httpc_cb cb;
    void *data;
    char *host, *port_str;
    int tls, head_req;
    uv_getaddrinfo_t gai;
    uv_timer_t timer;
    moat_sock_t sock;
    unsigned gai_pending : 1, timer_open : 1, sock_open : 1, finished : 1, cancelled : 1;
    moat_buf_t out, in;
    size_t head_len;
    moat_http1_msg_t msg;
    moat_header_t headers[MOAT_HTTPC_MAX_HEADERS];
    moat_http1_body_t reader;
    size_t body_pos; /* how far the body reader got in `in` */
    moat_buf_t body;
};

moat_httpc_t *moat_httpc_new(uv_loop_t *loop, const char *extra_root_pem, uint64_t timeout_ms,
                             char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL) {
        snprintf(err, errlen, "cannot create a TLS client context");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* The system bundle is optional (a minimal container may lack it); an extra root the
     * operator named is not. */
    if (access(SYSTEM_BUNDLE, R_OK) == 0)
        SSL_CTX_load_verify_locations(ctx, SYSTEM_BUNDLE, NULL);
    ERR_clear_error();
    if (extra_root_pem != NULL && !SSL_CTX_load_verify_locations(ctx, extra_root_pem, NULL)) {
        snprintf(err, errlen, "%s: cannot load it as PEM trust anchors", extra_root_pem);
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return NULL;
    }
    moat_httpc_t *h = moat_xcalloc(1, sizeof *h);
    h->loop = loop;
    h->ctx = ctx;
    h->timeout_ms = timeout_ms ? timeout_ms : 30000;
    return h;
}

static void maybe_free_client(moat_httpc_t *h)
{
    if (h->freeing && h->reqs == NULL) {
        SSL_CTX_free(h->ctx);
        free(h);
    }
}

static void req_maybe_free(req_t *r)
{
    if (r->gai_pending || r->timer_open || r->sock_open)
        return;
    moat_httpc_t *h = r->h;
    if (r->prev)
        r->prev->next = r->next;
    else
        h->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    moat_buf_free(&r->out);
    moat_buf_free(&r->in);
    moat_buf_free(&r->body);
    free(r->host);
    free(r->port_str);
    free(r);
    maybe_free_client(h);
}

static void on_timer_close(uv_handle_t *t)
{
    req_t *r = t->data;
    r->timer_open = 0;
    req_maybe_free(r);
}

/* Report (once) and tear the request down. resp NULL means a transport error `err`. */
static void finish(req_t *r, int err, moat_httpc_response_t *resp)
{
    if (r->finished)
        return;
    r->finished = 1;
    if (!r->cancelled) {
        moat_httpc_response_t e = {.err = err};
        r->cb(r->data, resp ? resp : &e);
    }
    if (r->timer_open)
        uv_close((uv_handle_t *)&r->timer, on_timer_close);
    if (r->sock_open)
        moat_sock_close(&r->sock);
    if (r->gai_pending)
        uv_cancel((uv_req_t *)&r->gai);
    req_maybe_free(r);
}

static void complete(req_t *r)
{
    /* The input buffer may have moved since the head was parsed: parse it again so the
     * header slices point into the buffer as it is now. */
    moat_http1_parse_response(moat_buf_data(&r->in), r->head_len, r->head_req, &r->msg, r->headers,
                              MOAT_HTTPC_MAX_HEADERS);
    moat_httpc_response_t resp = {.status = r->msg.status};
    char *copies[2 * MOAT_HTTPC_MAX_HEADERS];
    size_t nc = 0;
    for (size_t i = 0; i < r->msg.nheaders && i < MOAT_HTTPC_MAX_HEADERS; i++) {
        moat_header_t *hd = &r->msg.headers[i];
        resp.names[i] = copies[nc++] = moat_xstrndup(hd->name.base, hd->name.len);
        resp.values[i] = copies[nc++] = moat_xstrndup(hd->value.base, hd->value.len);
        resp.nheaders++;
    }
    if (moat_buf_append(&r->body, "", 1) != 0) {
        for (size_t i = 0; i < nc; i++)
            free(copies[i]);
        finish(r, MOAT_ENOMEM, NULL);
        return;
    }
    resp.body = moat_buf_data(&r->body);
    resp.body_len = moat_buf_size(&r->body) - 1;
    finish(r, 0, &resp);
    for (size_t i = 0; i < nc; i++)
        free(copies[i]);
}

/* Look at what arrived: the head first, then the body by its framing (the same reader the
 * proxy uses). */
static void progress(req_t *r, int eof)
{
    const char *base = moat_buf_data(&r->in);
    size_t len = moat_buf_size(&r->in);
    if (r->head_len == 0) {
        int n = moat_http1_parse_response(base, len, r->head_req, &r->msg, r->headers,
                                          MOAT_HTTPC_MAX_HEADERS);
        if (n == MOAT_ENEED_MORE) {
            if (eof)
                finish(r, MOAT_ECLOSED, NULL);
            return;
        }
        if (n < 0) {
            finish(r, MOAT_EPARSE, NULL);
            return;
        }
        if (r->msg.body == MOAT_BODY_LENGTH && r->msg.content_length > MOAT_HTTPC_MAX_BODY) {
            finish(r, MOAT_ETOO_LARGE, NULL);
            return;
        }
        r->head_len = (size_t)n;
        r->body_pos = r->head_len;
        moat_http1_body_init(&r->reader, r->msg.body, r->msg.content_length);
    }
    for (;;) {
        size_t used = 0;
        moat_slice_t d = {0};
        int rc = moat_http1_body_read(&r->reader, base + r->body_pos, len - r->body_pos, &used, &d);
        if (rc < 0) {
            finish(r, MOAT_EPARSE, NULL);
            return;
        }
        r->body_pos += used;
        if (d.len && (moat_buf_size(&r->body) + d.len > MOAT_HTTPC_MAX_BODY ||
                      moat_buf_append(&r->body, d.base, d.len) != 0)) {
            finish(r, MOAT_ETOO_LARGE, NULL);
            return;
        }
        if (rc == 1 || (eof && r->msg.body == MOAT_BODY_UNTIL_CLOSE && r->body_pos == len)) {
            complete(r);
            return;
        }
        if (used == 0 || r->body_pos == len)
            break;
    }
    if (eof)
        finish(r, MOAT_ECLOSED, NULL);
}

static void on_read(moat_sock_t *s)
{
    req_t *r = s->data;
    moat_slice_t in = moat_sock_input(s);
    if (moat_buf_size(&r->in) + in.len > MOAT_HTTPC_MAX_BODY + MOAT_HTTP1_MAX_HEAD + 65536) {
        finish(r, MOAT_ETOO_LARGE, NULL);
        return;
    }
    if (moat_buf_append(&r->in, in.base, in.len) != 0) {
        finish(r, MOAT_ENOMEM, NULL);
        return;
    }
    moat_sock_consume(s, in.len);
    progress(r, 0);
}

static void on_eof(moat_sock_t *s, int err)
{
    req_t *r = s->data;
    (void)err;
    progress(r, 1);
    if (!r->finished)
        finish(r, MOAT_ECLOSED, NULL);
}

static void on_drain(moat_sock_t *s)
{
    (void)s;
}

static void on_connect(moat_sock_t *s, int err)
{
    req_t *r = s->data;
    if (err != 0) {
        if (r->tls && s->ssl) {
            long v = SSL_get_verify_result(s->ssl);
            if (v != X509_V_OK)
                MOAT_WARN("HTTPS to %s: certificate not trusted: %s", r->host,
                          X509_verify_cert_error_string(v));
        }
        finish(r, err == MOAT_ETLS ? MOAT_ETLS : MOAT_EUPSTREAM, NULL);
        return;
    }
    moat_sock_read_start(s);
    if (moat_sock_write(s, moat_buf_data(&r->out), moat_buf_size(&r->out)) != 0)
        finish(r, MOAT_EIO, NULL);
}

static void on_sock_close(moat_sock_t *s)
{
    req_t *r = s->data;
    r->sock_open = 0;
    req_maybe_free(r);
}

static const moat_sock_cb_t sock_cb = {
    .on_read = on_read,
    .on_eof = on_eof,
    .on_drain = on_drain,
    .on_connect = on_connect,
    .on_close = on_sock_close,
};

static void on_timeout(uv_timer_t *t)
{
    finish(t->data, MOAT_ETIMEOUT, NULL);
}

static void on_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *ai)
{
    req_t *r = g->data;
    r->gai_pending = 0;
    if (r->finished) {
        uv_freeaddrinfo(ai);
        req_maybe_free(r);
        return;
    }
    if (status != 0 || ai == NULL) {
        MOAT_WARN("cannot resolve %s: %s", r->host, status ? uv_strerror(status) : "no address");
        uv_freeaddrinfo(ai);
        finish(r, MOAT_EUPSTREAM, NULL);
        return;
    }
    SSL *ssl = NULL;
    if (r->tls) {
        ssl = SSL_new(r->h->ctx);
        unsigned char bin[16];
        int ip = inet_pton(AF_INET, r->host, bin) == 1 || inet_pton(AF_INET6, r->host, bin) == 1;
        X509_VERIFY_PARAM *p = SSL_get0_param(ssl);
        int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(p, r->host)
                    : X509_VERIFY_PARAM_set1_host(p, r->host, strlen(r->host)) &&
                          SSL_set_tlsext_host_name(ssl, r->host);
        if (!ok) {
            SSL_free(ssl);
            uv_freeaddrinfo(ai);
            finish(r, MOAT_ETLS, NULL);
            return;
        }
    }
    int rc = moat_sock_connect(&r->sock, r->h->loop, ai->ai_addr, ai->ai_addrlen, ssl, &sock_cb, r);
    uv_freeaddrinfo(ai);
    if (rc != 0) {
        finish(r, rc, NULL);
        return;
    }
    r->sock_open = 1;
}

int moat_httpc_request(moat_httpc_t *h, const char *method, const char *url,
                       const char *content_type, const void *body, size_t len, moat_httpc_cb cb,
                       void *data)
{
    return moat_httpc_request_ex(h, method, url, NULL, content_type, body, len, cb, data);
}

/* Header lines: each ends in CRLF, with no other CR or LF (no way to start a new header or
 * end the head early). */
static int headers_ok(const char *x)
{
    size_t n = strlen(x);
    if (n < 2 || x[n - 2] != '\r' || x[n - 1] != '\n' || x[0] == '\r' || x[0] == '\n')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (x[i] == '\r' && (i + 1 >= n || x[i + 1] != '\n'))
            return 0;
        if (x[i] == '\n' && (x[i - 1] != '\r' || (i + 1 < n && x[i + 1] == '\r')))
            return 0; /* a bare LF, or an empty line that would end the head */
    }
    return 1;
}

int moat_httpc_request_ex(moat_httpc_t *h, const char *method, const char *url,
                          const char *extra_headers, const char *content_type, const void *body,
                          size_t len, moat_httpc_cb cb, void *data)
{
    int tls;
    if (extra_headers != NULL && !headers_ok(extra_headers))
        return MOAT_EINVAL;
    const char *p;
    if (strncmp(url, "https://", 8) == 0) {
        tls = 1;
        p = url + 8;
    } else if (strncmp(url, "http://", 7) == 0) {
        tls = 0;
        p = url + 7;
    } else {
        return MOAT_EINVAL;
    }
    const char *path = strchr(p, '/');
    size_t alen = path ? (size_t)(path - p) : strlen(p);
    if (alen == 0 || alen > 300)
        return MOAT_EINVAL;
    char auth[301];
    memcpy(auth, p, alen);
    auth[alen] = '\0';
    char *host, *port;
    if (auth[0] == '[') {
        char *e = strchr(auth, ']');
        if (e == NULL)
            return MOAT_EINVAL;
        *e = '\0';
        host = auth + 1;
        port = e[1] == ':' ? e + 2 : NULL;
    } else {
        host = auth;
        port = strchr(auth, ':');
        if (port)
            *port++ = '\0';
    }
    req_t *r = moat_xcalloc(1, sizeof *r);
    r->h = h;
    r->cb = cb;
    r->data = data;
    r->tls = tls;
    r->head_req = strcmp(method, "HEAD") == 0;
    r->host = moat_xstrdup(host);
    r->port_str = moat_xstrdup(port && *port ? port : tls ? "443" : "80");
    int v6 = strchr(host, ':') != NULL;
    int defport = port == NULL || strcmp(r->port_str, tls ? "443" : "80") == 0;
    int rc = moat_buf_appendf(&r->out,
                              "%s %s HTTP/1.1\r\nHost: %s%s%s%s%s\r\nUser-Agent: moat/" MOAT_VERSION
                              "\r\nAccept: */*\r\nConnection: close\r\n",
                              method, path ? path : "/", v6 ? "[" : "", host, v6 ? "]" : "",
                              defport ? "" : ":", defport ? "" : r->port_str);
    if (rc == 0 && extra_headers)
        rc = moat_buf_append(&r->out, extra_headers, strlen(extra_headers));
    if (rc == 0 && content_type)
        rc = moat_buf_appendf(&r->out, "Content-Type: %s\r\nContent-Length: %zu\r\n", content_type,
                              len);
    else if (rc == 0 && strcmp(method, "POST") == 0)
        rc = moat_buf_appendf(&r->out, "Content-Length: 0\r\n");
    if (rc == 0)
        rc = moat_buf_append(&r->out, "\r\n", 2);
    if (rc == 0 && content_type && len)
        rc = moat_buf_append(&r->out, body, len);
    r->next = h->reqs;
    if (h->reqs)
        h->reqs->prev = r;
    h->reqs = r;
    if (rc != 0) {
        r->finished = 1;
        req_maybe_free(r);
        return MOAT_ENOMEM;
    }
    uv_timer_init(h->loop, &r->timer);
    r->timer.data = r;
    r->timer_open = 1;
    uv_timer_start(&r->timer, on_timeout, h->timeout_ms, 0);
    r->gai.data = r;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    if (uv_getaddrinfo(h->loop, &r->gai, on_resolved, r->host, r->port_str, &hints) != 0) {
        r->finished = 1;
        uv_close((uv_handle_t *)&r->timer, on_timer_close);
        return MOAT_EIO;
    }
    r->gai_pending = 1;
    return 0;
}

void moat_httpc_free(moat_httpc_t *h)
{
    if (h == NULL)
        return;
    h->freeing = 1;
    req_t *r = h->reqs;
    if (r == NULL) {
        maybe_free_client(h);
        return;
    }
    while (r) {
        req_t *next = r->next;
        finish(r, MOAT_ECLOSED, NULL);
        r = next;
    }
}
