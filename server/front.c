/* The front-end core (server/front.h): request admission, moat's own answers and the access
 * log, for HTTP/1.1 requests and HTTP/2 streams alike. */
#include "front.h"
#include "redirect.h"
#include "worker.h"

#include "moat/log.h"

#include <arpa/inet.h>
#include <openssl/rand.h>

static void copy_field(char *dst, size_t cap, moat_slice_t s)
{
    size_t n = MOAT_MIN(s.len, cap - 1);
    if (n)
        memcpy(dst, s.base, n);
    dst[n] = 0;
}

void moat_front_init(moat_front_t *f, moat_worker_t *w, const moat_front_ops_t *ops, void *stream,
                     const struct sockaddr *peer, int port, int tls)
{
    memset(f, 0, sizeof *f);
    f->w = w;
    f->ops = ops;
    f->stream = stream;
    f->peer = peer;
    f->port = port;
    f->tls = tls != 0;
}

/* The request's counters, on this worker's own block (server/metrics.h). */
static void count(moat_front_t *f, uint64_t in, uint64_t out, uint64_t dur_ms, const char *upstream,
                  uint64_t upstream_ms)
{
    moat_metrics_t *m = f->w->metrics;
    if (m == NULL)
        return;
    moat_msite_t *ms = &m->sites[f->site ? f->site->mslot : 0];
    unsigned sc = (unsigned)f->status / 100;
    if (sc < 1 || sc > 5)
        sc = 5;
    moat_mc_inc(&m->requests);
    moat_mc_inc(&ms->requests[moat_metrics_method(f->method)][sc - 1]);
    moat_mc_inc(&ms->dur[moat_metrics_dur_bucket(dur_ms)]);
    moat_mc_add(&ms->dur_sum_ms, dur_ms);
    moat_mc_add(&ms->bytes_in, in);
    moat_mc_add(&ms->bytes_out, out);
    if (upstream != NULL && upstream[0]) {
        moat_mc_inc(&ms->up[moat_metrics_dur_bucket(upstream_ms)]);
        moat_mc_add(&ms->up_sum_ms, upstream_ms);
        moat_mc_inc(&ms->up_count);
    }
}

/* A fresh request id: a random prefix per worker thread (taken once) and the thread's count,
 * 20 hex digits. No syscall, no lock. */
static void new_request_id(char *out)
{
    static _Thread_local uint32_t prefix;
    static _Thread_local uint64_t seq;
    static const char hex[] = "0123456789abcdef";
    if (seq == 0) {
        RAND_bytes((uint8_t *)&prefix, sizeof prefix);
        seq = 1;
    }
    uint64_t n = seq++;
    for (int i = 0; i < 8; i++)
        out[i] = hex[(prefix >> (28 - 4 * i)) & 15];
    for (int i = 19; i >= 8; i--, n >>= 4)
        out[i] = hex[n & 15];
    out[20] = 0;
}

/* An X-Request-Id worth keeping: 1 to 64 of [A-Za-z0-9._-] (it lands in log lines and
 * upstream heads). */
static int good_request_id(moat_slice_t v)
{
    if (v.len == 0 || v.len > MOAT_REQUEST_ID_MAX)
        return 0;
    for (size_t i = 0; i < v.len; i++) {
        char c = v.base[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

const char *moat_front_context(const moat_front_t *f, char *buf, size_t n)
{
    char name[300] = "-", ip[INET6_ADDRSTRLEN + 8] = "?", st[24] = "";
    if (f->site != NULL)
        moat_runtime_site_name(f->site->site, name, sizeof name);
    moat_format_ip(f->peer, ip, sizeof ip);
    unsigned port = 0;
    if (f->peer && f->peer->sa_family == AF_INET)
        port = ntohs(((const struct sockaddr_in *)f->peer)->sin_port);
    else if (f->peer && f->peer->sa_family == AF_INET6)
        port = ntohs(((const struct sockaddr_in6 *)f->peer)->sin6_port);
    if (f->stream_id)
        snprintf(st, sizeof st, " stream=%u", (unsigned)f->stream_id);
    int v6 = strchr(ip, ':') != NULL;
    snprintf(buf, n, "site=%s client=%s conn=%s%s%s:%u%s request=%s", name,
             f->remote[0] ? f->remote : ip, v6 ? "[" : "", ip, v6 ? "]" : "", port, st,
             f->request_id);
    return buf;
}

static const char *front_context(const void *ctx, char *buf, size_t n)
{
    return moat_front_context(ctx, buf, n);
}

static void log_entry(moat_front_t *f, const char *upstream, uint64_t upstream_ms)
{
    if (f->logged)
        return;
    f->logged = 1;
    uint64_t in = 0, out = 0;
    f->ops->counts(f->stream, &in, &out);
    uint64_t duration = uv_now(&f->w->loop) - f->t_start;
    count(f, in, out, duration, upstream, upstream_ms);
    moat_access_entry_t e = {
        .peer = f->peer,
        .remote = f->remote,
        .host = f->host,
        .method = f->method,
        .path = f->path,
        .proto = f->proto,
        .tls = f->tls,
        .status = f->status,
        .bytes_in = in,
        .bytes_out = out,
        .duration_ms = duration,
        .upstream = upstream,
        .upstream_ms = upstream_ms,
        .request_id = f->request_id,
    };
    moat_access_log_request(&e);
}

static void release(moat_front_t *f)
{
    if (f->rt != NULL) {
        moat_worker_runtime_release(f->w, f->rt);
        f->rt = NULL;
    }
    f->site = NULL;
}

void moat_front_answer(moat_front_t *f, int status, const moat_header_t *headers, size_t n,
                       moat_slice_t body)
{
    const moat_front_ops_t *ops = f->ops;
    f->status = status;
    int has_body = !f->head_req && body.len > 0;
    if (ops->send_head(f->stream, status, headers, n, (int64_t)body.len, has_body) == 0 &&
        (!has_body || ops->send_data(f->stream, body) == 0))
        ops->send_end(f->stream);
    ops->flush(f->stream);
    log_entry(f, "", 0);
    release(f);
}

static void answer_page(moat_front_t *f, int status)
{
    moat_front_answer(f, status, moat_http_page_headers, MOAT_HTTP_PAGE_NHEADERS,
                      moat_slice_str(moat_http_error_page(status)));
}

/* Behind a trusted proxy (trusted_proxies=) the client is the last X-Forwarded-For hop, the
 * one that proxy added; logs show it instead of the proxy. Only a valid IP is taken. */
static void trusted_remote(moat_front_t *f, const moat_front_req_t *req)
{
    const moat_site_t *site = f->site->site;
    int trusted = 0;
    for (size_t i = 0; i < site->ntrusted && !trusted; i++)
        trusted = moat_cidr_match(&site->trusted[i], f->peer);
    moat_slice_t xff = {0};
    for (size_t i = 0; trusted && i < req->nheaders; i++) {
        if (moat_slice_ieq(req->headers[i].name, "x-forwarded-for"))
            xff = req->headers[i].value; /* the last field carries the last hop */
        /* The proxy in front already named the request: its logs and ours then agree. */
        if (moat_slice_ieq(req->headers[i].name, "x-request-id") &&
            good_request_id(req->headers[i].value)) {
            memcpy(f->request_id, req->headers[i].value.base, req->headers[i].value.len);
            f->request_id[req->headers[i].value.len] = 0;
        }
    }
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
        memcpy(f->remote, ip, n + 1);
}

static void begin(moat_front_t *f, moat_slice_t method, moat_slice_t host, moat_slice_t path,
                  const char *proto)
{
    f->t_start = uv_now(&f->w->loop);
    f->proto = proto;
    f->status = 0;
    f->body_seen = 0;
    f->responded = f->body_unread = f->logged = 0;
    f->head_req = moat_slice_eq(method, "HEAD");
    f->remote[0] = 0;
    copy_field(f->method, sizeof f->method, method);
    copy_field(f->host, sizeof f->host, host);
    copy_field(f->path, sizeof f->path, path);
    new_request_id(f->request_id);
}

void moat_front_reject(moat_front_t *f, int status, const char *proto)
{
    begin(f, MOAT_SLICE_LIT("-"), (moat_slice_t){0}, (moat_slice_t){0}, proto);
    f->body_unread = 1;
    answer_page(f, status);
}

/* Methods are case-sensitive tokens (RFC 9110 §9.1) and every registered one is upper case.
 * A lower-case "trace" or "get" is a probe: an app that compares methods without regard to
 * case would take it for a method moat refuses or treats specially. Refused, as nginx does. */
static int method_has_lower(moat_slice_t m)
{
    for (size_t i = 0; i < m.len; i++)
        if (m.base[i] >= 'a' && m.base[i] <= 'z')
            return 1;
    return 0;
}

moat_front_result_t moat_front_start(moat_front_t *f, const moat_front_req_t *req)
{
    begin(f, req->method, req->authority, req->target, req->proto);
    int has_body = req->body != MOAT_REQ_BODY_NONE;
    /* Any answer below comes before the body is read. */
    f->body_unread = has_body;
    if (req->authority.len == 0 || method_has_lower(req->method)) {
        answer_page(f, 400);
        return MOAT_FRONT_ANSWERED;
    }
    f->rt = moat_worker_runtime_acquire(f->w);
    const moat_site_rt_t *site = moat_runtime_find_site(f->rt, req->authority, f->port, f->tls);
    if (site == NULL && !f->tls && moat_redirect_answer(f, req))
        return MOAT_FRONT_ANSWERED;
    if (site == NULL) {
        answer_page(f, 404);
        return MOAT_FRONT_ANSWERED;
    }
    f->site = site;
    f->max_body = site->site->max_body;
    trusted_remote(f, req);
    int extended_connect = 0;
    if (moat_slice_eq(req->method, "CONNECT")) {
        /* Only RFC 8441 websockets: moat is not a forward proxy. */
        if (!moat_slice_eq(req->protocol, "websocket") || !site->site->h2_websocket) {
            answer_page(f, 501);
            return MOAT_FRONT_ANSWERED;
        }
        extended_connect = 1;
    }
    if (f->max_body && req->body == MOAT_REQ_BODY_LENGTH && req->content_length > f->max_body) {
        answer_page(f, 413); /* refused before a byte of the body is read */
        return MOAT_FRONT_ANSWERED;
    }
    if (moat_slice_eq(req->method, "TRACE")) {
        /* As nginx does: a TRACE would echo the request, cookies included, back to whoever
         * can make a browser send one; no app behind moat needs it. */
        answer_page(f, 405);
        return MOAT_FRONT_ANSWERED;
    }
    moat_slice_t upgrade_proto = req->protocol;
    for (size_t i = 0; req->upgrade && i < req->nheaders; i++)
        if (moat_slice_ieq(req->headers[i].name, "upgrade"))
            upgrade_proto = req->headers[i].value;
    /* Only a websocket upgrade passes. Anything else (h2c above all: it would let a client
     * speak HTTP/2 straight to the app, past moat's checks) goes upstream as an ordinary
     * request, its Connection, Upgrade and HTTP2-Settings fields dropped as hop-by-hop. */
    int upgrade = req->upgrade && moat_slice_ieq(upgrade_proto, "websocket");
    moat_request_t r = {
        .method = req->method,
        .target = req->target,
        .authority = req->authority,
        .headers = req->headers,
        .nheaders = req->nheaders,
        .h1 = req->h1,
        .body = extended_connect ? MOAT_REQ_BODY_NONE : req->body,
        .content_length = req->content_length,
        .upgrade = upgrade || extended_connect,
        .extended_connect = extended_connect,
        .upgrade_proto = upgrade_proto,
        .tls = f->tls,
        .peer = f->peer,
        .request_id = moat_slice_str(f->request_id),
        .context = front_context,
        .ctx = f,
    };
    if (req->expect_continue && has_body && f->ops->send_continue)
        f->ops->send_continue(f->stream);
    int started = moat_proxy_start(f->w, f->rt, site, &r, f->ops, f->stream, &f->x);
    if (started != 0) {
        /* Nothing reached the app. Out of descriptors or memory is moat's own shortage: 503
         * (the upstream is not marked down for it), anything else 502. */
        f->x = NULL;
        answer_page(f, started == MOAT_ENOMEM ? 503 : 502);
        return MOAT_FRONT_ANSWERED;
    }
    f->body_unread = 0;
    return MOAT_FRONT_PROXYING;
}

int moat_front_body(moat_front_t *f, moat_slice_t data)
{
    if (f->x == NULL)
        return MOAT_ECLOSED;
    f->body_seen += data.len;
    if (f->max_body && f->body_seen > f->max_body) {
        moat_front_refuse_body(f, 413);
        return MOAT_ETOO_LARGE;
    }
    return moat_proxy_body(f->x, data);
}

void moat_front_refuse_body(moat_front_t *f, int status)
{
    if (f->x != NULL) {
        moat_proxy_abort(f->x);
        f->x = NULL;
    }
    f->body_unread = 1;
    if (!f->responded && f->rt != NULL)
        answer_page(f, status);
    else
        moat_front_abort(f);
}

int moat_front_body_end(moat_front_t *f)
{
    return f->x != NULL ? moat_proxy_body_end(f->x) : MOAT_ECLOSED;
}

void moat_front_finish(moat_front_t *f, const moat_exchange_result_t *res)
{
    f->x = NULL;
    if (res->status)
        f->status = res->status;
    log_entry(f, res->upstream, res->upstream_ms);
    release(f);
}

void moat_front_abort(moat_front_t *f)
{
    if (f->x != NULL) {
        moat_proxy_abort(f->x);
        f->x = NULL;
    }
    if (f->rt != NULL || (f->t_start && !f->logged)) {
        if (!f->status)
            f->status = 499;
        log_entry(f, "", 0);
    }
    release(f);
}
