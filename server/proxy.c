/* The reverse proxy: one exchange per request, between a front end (include/moat/proxy.h)
 * and an HTTP/1.1 upstream connection (server/upstream.c).
 *
 * Re-entrancy: an exchange is reference-counted. Its life holds one reference, every
 * upstream event another while it runs; moat__proxy_complete() and moat_proxy_abort() only
 * mark it over and drop the life reference, so code after a front-end call that ended the
 * exchange still reads valid memory and stops at the `over` check.
 *
 * Requests that wait for an app that is restarting (upstream_wait=) are kept by
 * server/proxy_wait.c; the exchange itself is in server/proxy_internal.h. */
#include "proxy_internal.h"
#include "moat/log.h"
#include "moat/mem.h"
#include "resolver.h"

#include <arpa/inet.h>
#include <openssl/base64.h>
#include <openssl/rand.h>
#include <stdlib.h>

#define MAX_RESPONSE_HEADERS 128
/* A failing upstream is skipped for this long (passive health check). */
#define UPSTREAM_DOWN_MS 10000
/* A dial to a named upstream taking longer than this has its name looked up again: a
 * vanished container's address gets no answer, and this is how it is noticed early. */
#define SLOW_DIAL_MS 500

static const moat_upconn_cb_t up_cb;
static void handle_response(moat_exchange_t *x);
static void fail(moat_exchange_t *x, int status, const char *why);

void moat__proxy_hold(moat_exchange_t *x)
{
    x->refs++;
}

static void drop(moat_exchange_t *x)
{
    if (--x->refs > 0)
        return;
    if (x->tunnel && x->w->metrics)
        moat_mc_dec(&x->w->metrics->conns[MOAT_MC_WS]);
    moat_buf_free(&x->head);
    moat_buf_free(&x->pending);
    if (x->rt_held != NULL)
        moat_worker_runtime_release(x->w, x->rt_held);
    moat_mem_free(x);
}

/* The end of an upstream event: what it gave the front end goes out now. */
void moat__proxy_leave(moat_exchange_t *x)
{
    if (!x->over && x->produced) {
        x->produced = 0;
        x->ops->flush(x->front);
    }
    drop(x);
}

static int out_head(moat_exchange_t *x, int status, const moat_header_t *h, size_t n,
                    int64_t content_length, int has_body)
{
    x->produced = 1;
    return x->ops->send_head(x->front, status, h, n, content_length, has_body);
}

static int out_data(moat_exchange_t *x, moat_slice_t data)
{
    x->produced = 1;
    return x->ops->send_data(x->front, data);
}

static int out_end(moat_exchange_t *x)
{
    x->produced = 1;
    return x->ops->send_end(x->front);
}

/* ---- helpers ---- */

static int is_idempotent(moat_slice_t m)
{
    return moat_slice_eq(m, "GET") || moat_slice_eq(m, "HEAD") || moat_slice_eq(m, "OPTIONS") ||
           moat_slice_eq(m, "PUT") || moat_slice_eq(m, "DELETE");
}

static int peer_trusted(const moat_site_t *site, const struct sockaddr *peer)
{
    for (size_t i = 0; i < site->ntrusted; i++)
        if (moat_cidr_match(&site->trusted[i], peer))
            return 1;
    return 0;
}

static int put(moat_buf_t *b, moat_slice_t s)
{
    return moat_buf_append(b, s.base, s.len);
}

/* The upstream request head: the client's fields minus hop-by-hop and framing ones, with
 * moat's own forwarding and framing fields. Host is passed unchanged (port included):
 * apps build absolute redirects from it. */
static int build_head(moat_exchange_t *x, const moat_request_t *req)
{
    moat_buf_t *b = &x->head;
    const moat_site_t *site = x->site->site;
    int trusted = peer_trusted(site, req->peer);
    moat_slice_t xff = {0}, xfp = {0}, xfh = {0};
    int r = 0;
    r |= put(b, req->extended_connect ? MOAT_SLICE_LIT("GET") : req->method);
    r |= moat_buf_append(b, " ", 1);
    r |= put(b, req->target);
    r |= moat_buf_append(b, " HTTP/1.1\r\nHost: ", 17);
    r |= put(b, req->authority);
    r |= moat_buf_append(b, "\r\n", 2);
    for (size_t i = 0; i < req->nheaders; i++) {
        moat_slice_t n = req->headers[i].name, v = req->headers[i].value;
        if (moat_http1_is_hop_by_hop(req->h1, n) || moat_slice_ieq(n, "host") ||
            moat_slice_ieq(n, "content-length") || moat_slice_ieq(n, "expect") ||
            (req->extended_connect && moat_slice_ieq(n, "sec-websocket-key")))
            continue;
        if (moat_slice_ieq(n, "x-forwarded-for")) {
            xff = v;
            continue;
        }
        if (moat_slice_ieq(n, "x-forwarded-proto")) {
            xfp = v;
            continue;
        }
        if (moat_slice_ieq(n, "x-forwarded-host")) {
            xfh = v;
            continue;
        }
        if ((moat_slice_ieq(n, "forwarded") && !trusted) || moat_slice_ieq(n, "x-request-id"))
            continue;
        if (x->get_req && moat_slice_ieq(n, "accept") && memmem(v.base, v.len, "text/html", 9))
            x->html = 1; /* a browser loading a page: its 502 page retries by itself */
        r |= put(b, n);
        r |= moat_buf_append(b, ": ", 2);
        r |= put(b, v);
        r |= moat_buf_append(b, "\r\n", 2);
    }
    /* Client-sent X-Forwarded-* are replaced unless the peer is a trusted proxy (a load
     * balancer or Cloudflare in front of moat), whose values are kept and extended. */
    char ip[INET6_ADDRSTRLEN + 1];
    moat_format_ip(req->peer, ip, sizeof ip);
    r |= moat_buf_puts(b, "X-Forwarded-For: ");
    if (trusted && xff.len) {
        r |= moat_buf_put(b, xff);
        r |= moat_buf_puts(b, ", ");
    }
    r |= moat_buf_puts(b, ip);
    r |= moat_buf_puts(b, "\r\nX-Forwarded-Proto: ");
    if (trusted && xfp.len)
        r |= moat_buf_put(b, xfp);
    else
        r |= moat_buf_puts(b, req->tls ? "https" : "http");
    r |= moat_buf_puts(b, "\r\nX-Forwarded-Host: ");
    r |= moat_buf_put(b, trusted && xfh.len ? xfh : req->authority);
    r |= moat_buf_puts(b, "\r\n");
    if (req->request_id.len) {
        r |= moat_buf_puts(b, "X-Request-Id: ");
        r |= moat_buf_put(b, req->request_id);
        r |= moat_buf_puts(b, "\r\n");
    }
    if (req->body == MOAT_REQ_BODY_LENGTH) {
        r |= moat_buf_puts(b, "Content-Length: ");
        r |= moat_buf_put_u64(b, req->content_length);
        r |= moat_buf_puts(b, "\r\n");
    } else if (req->body == MOAT_REQ_BODY_STREAM) {
        r |= moat_buf_puts(b, "Transfer-Encoding: chunked\r\n");
    }
    if (req->upgrade) {
        /* Only a request that asks for a switch carries these: uvicorn's h11 parser answers
         * 400 to "Connection: upgrade" on an ordinary request. */
        r |= moat_buf_puts(b, "Connection: upgrade\r\nUpgrade: ");
        r |= moat_buf_put(b, req->upgrade_proto);
        r |= moat_buf_puts(b, "\r\n");
    }
    if (req->extended_connect) {
        /* The upstream speaks HTTP/1.1 and needs a Sec-WebSocket-Key; an RFC 8441 client
         * sends none (§5), so moat makes one. Its Accept answer is dropped on the way back
         * by the HTTP/2 front end. Version, Extensions and Protocol pass through. */
        uint8_t raw[16];
        char key[32];
        RAND_bytes(raw, sizeof raw);
        EVP_EncodeBlock((uint8_t *)key, raw, sizeof raw);
        r |= moat_buf_puts(b, "Sec-WebSocket-Key: ");
        r |= moat_buf_puts(b, key);
        r |= moat_buf_puts(b, "\r\n");
    }
    r |= moat_buf_append(b, "\r\n", 2);
    return r ? MOAT_ENOMEM : 0;
}

/* lb=cookie names an upstream by a hash of its label: the cookie does not reveal the
 * internal address and survives a reload that reorders the upstream list. */
static uint32_t label_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* The index of the upstream named by the request's moat_upstream cookie, or -1. */
static int sticky_index(const moat_site_rt_t *s, const moat_request_t *req)
{
    static const char name[] = "moat_upstream=";
    const size_t nl = sizeof name - 1;
    for (size_t i = 0; i < req->nheaders; i++) {
        moat_slice_t v = req->headers[i].value;
        if (!moat_slice_ieq(req->headers[i].name, "cookie"))
            continue;
        for (size_t p = 0; p + nl + 8 <= v.len; p++) {
            if ((p > 0 && v.base[p - 1] != ' ' && v.base[p - 1] != ';') ||
                memcmp(v.base + p, name, nl) != 0)
                continue;
            uint32_t h = 0;
            for (size_t k = 0; k < 8; k++) {
                char c = v.base[p + nl + k];
                int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
                if (d < 0)
                    return -1;
                h = h << 4 | (uint32_t)d;
            }
            for (size_t k = 0; k < s->nupstreams; k++)
                if (label_hash(s->upstreams[k].label) == h)
                    return (int)k;
            return -1;
        }
    }
    return -1;
}

static const moat_upstream_t *pick_upstream(moat_exchange_t *x)
{
    const moat_site_rt_t *s = x->site;
    uint64_t now = uv_now(&x->w->loop);
    size_t n = s->nupstreams;
    if (s->site->lb == MOAT_LB_COOKIE && n > 1) {
        /* Sticky while the named upstream is up (socket.io polling must keep reaching the
         * replica that holds its session); otherwise round robin and name the new one. */
        if (x->sticky >= 0 && (size_t)x->sticky < n &&
            moat_upstream_state(x->w, s->upstreams[x->sticky].label)->down_until_ms <= now)
            return &s->upstreams[x->sticky];
        x->set_cookie = 1;
    }
    size_t best = x->w->rr++ % n;
    if (x->site->site->lb == MOAT_LB_LEAST_CONN) {
        unsigned best_active = ~0u;
        for (size_t i = 0; i < n; i++) {
            size_t c = (best + i) % n;
            moat_upstream_state_t *st = moat_upstream_state(x->w, s->upstreams[c].label);
            if (st->down_until_ms <= now && st->active < best_active) {
                best_active = st->active;
                best = c;
            }
        }
        return &s->upstreams[best];
    }
    for (size_t i = 0; i < n; i++) {
        size_t c = (best + i) % n;
        if (moat_upstream_state(x->w, s->upstreams[c].label)->down_until_ms <= now)
            return &s->upstreams[c];
    }
    return &s->upstreams[best]; /* all marked down: try anyway */
}

/* The timeout that applies now, counted from now: called on every upstream read, so it only
 * moves a deadline (see moat_upconn_set_timeout). */
static void arm_timer(moat_exchange_t *x)
{
    const moat_site_t *site = x->site->site;
    uint64_t connect_ms = site->connect_timeout_ms;
    if (!x->up->connected && x->waited) {
        /* A request that waits for the app gets its answer near upstream_wait, not a whole
         * connect_timeout after it. */
        uint64_t now = uv_now(&x->w->loop);
        uint64_t left = x->wait_until > now ? x->wait_until - now : 0;
        connect_ms = MOAT_MIN(connect_ms, MOAT_MAX(left, (uint64_t)WAIT_FIRST_MS));
    }
    x->slow_mark = 0;
    if (!x->up->connected && x->upstream->named && !x->slow_kicked && connect_ms > SLOW_DIAL_MS) {
        /* First the slow-dial mark (up_on_timeout), then the rest of the connect timeout. */
        x->slow_mark = 1;
        x->connect_rest = connect_ms - SLOW_DIAL_MS;
        connect_ms = SLOW_DIAL_MS;
    }
    moat_upconn_set_timeout(x->up, !x->up->connected ? connect_ms
                                   : x->tunnel       ? site->ws_idle_timeout_ms
                                                     : site->read_timeout_ms);
}

/* Request body bytes go to the upstream connection (queued there while it connects), or into
 * `pending` while the request waits for one. */
static int body_out(moat_exchange_t *x, const moat_slice_t *v, size_t n)
{
    if (x->up != NULL)
        return moat_sock_writev(&x->up->sock, v, n);
    for (size_t i = 0; i < n; i++)
        if (moat_buf_append(&x->pending, v[i].base, v[i].len) != 0)
            return MOAT_ENOMEM;
    return 0;
}

static size_t body_queued(const moat_exchange_t *x)
{
    return x->up != NULL ? moat_sock_queued(&x->up->sock) : moat_buf_size(&x->pending);
}

void moat__proxy_pause_client(moat_exchange_t *x)
{
    if (!x->client_paused && !x->req_done) {
        x->client_paused = 1;
        x->ops->pause_body(x->front, 1);
    }
}

/* The upstream as error lines name it: with the address dialled (see refused()). */
const char *moat__proxy_who(const moat_exchange_t *x, char *buf, size_t n)
{
    return x->upstream != NULL ? moat_upstream_describe(x->upstream, buf, n) : "-";
}

/* A connection was refused: keep the body bytes written to it (after the head, which x->head
 * still holds) for the next one. Only on that failure path. */
int moat__proxy_keep_unsent(moat_exchange_t *x)
{
    moat_slice_t s = moat_upconn_unsent(x->up);
    size_t head = moat_buf_size(&x->head);
    if (s.len <= head)
        return 0;
    return moat_buf_append(&x->pending, s.base + head, s.len - head);
}

/* A connection is attached (its head written): what was kept goes first; once it is up, the
 * client may send more. */
static int send_pending(moat_exchange_t *x)
{
    int r = 0;
    if (moat_buf_size(&x->pending) > 0) {
        r = moat_sock_write(&x->up->sock, moat_buf_data(&x->pending), moat_buf_size(&x->pending));
        if (r == 0)
            moat_buf_free(&x->pending);
    }
    if (r == 0 && x->up->connected && x->client_paused &&
        moat_sock_queued(&x->up->sock) <= MOAT_PROXY_HIGH_WATER) {
        x->client_paused = 0;
        x->ops->pause_body(x->front, 0);
    }
    return r;
}

/* This attempt was refused (refused, unreachable, no answer in time): skip the upstream for a
 * while, say so once per outage with the address dialled, and have its name looked up again
 * (a recreated container comes back elsewhere). */
static void refused(moat_exchange_t *x, const char *how, int err, int os_err)
{
    uint64_t now = uv_now(&x->w->loop);
    char w[320];
    const char *why = os_err ? strerror(os_err) : moat_strerror(err);
    if (x->ustate->down_until_ms <= now) {
        char ctx[512] = "";
        if (x->context)
            x->context(x->ctx, ctx, sizeof ctx);
        MOAT_WARN("upstream %s %s (%s): marked down for %d s%s%s", moat__proxy_who(x, w, sizeof w),
                  how, why, UPSTREAM_DOWN_MS / 1000, ctx[0] ? "; " : "", ctx);
    } else
        MOAT_DEBUG("upstream %s %s (%s)", moat__proxy_who(x, w, sizeof w), how, why);
    x->ustate->down_until_ms = now + UPSTREAM_DOWN_MS;
    moat_metrics_t *m = x->w->metrics;
    if (m != NULL) {
        unsigned slot = x->upstream->mslot;
        moat_mc_inc(&m->ups[slot].failures);
        moat_mc_set(&m->health[slot].last_fail_ms, now);
        moat_mc_set(&m->health[slot].down_until_ms, now + UPSTREAM_DOWN_MS);
        moat_mc_set(&m->health[slot].last_err, (uint64_t)(int64_t)(os_err ? os_err : err));
    }
    if (x->upstream->named)
        moat_resolver_kick();
}

void moat__proxy_release_upstream(moat_exchange_t *x, int reusable)
{
    moat_upconn_t *u = x->up;
    if (u == NULL)
        return;
    x->up = NULL;
    x->ustate->active--;
    moat_upconn_release(u, reusable, x->site->site->pool_idle_ms);
}

/* Attach x to an upstream connection (pooled or new) and send the head. No callback runs
 * inside this call. */
int moat__proxy_connect(moat_exchange_t *x)
{
    for (;;) {
        x->tries++;
        x->upstream = pick_upstream(x);
        x->ustate = moat_upstream_state(x->w, x->upstream->label);
        moat_upconn_t *u = moat_upconn_take(x->w, x->upstream, &up_cb, x);
        x->reused = u != NULL;
        if (u == NULL) {
            /* It failed lately: its name may have moved, and a dial to a vanished container's
             * address can hang for seconds before it fails and asks for that itself. */
            if (x->upstream->named && x->ustate->down_until_ms > uv_now(&x->w->loop))
                moat_resolver_kick();
            int os_err = 0;
            x->slow_kicked = 0;
            int r =
                moat_upconn_dial(x->w, x->upstream, x->rt->upstream_tls, &up_cb, x, &u, &os_err);
            if (r == MOAT_ENOMEM) {
                /* moat's own shortage (descriptors, memory): the client gets 503 and the
                 * upstream is not marked down. */
                if (moat_worker_may_say(x->w, &x->w->dial_short_said_at))
                    MOAT_WARN("cannot open a connection to upstream %s: %s (answering 503; raise "
                              "LimitNOFILE or ulimit -n if it is descriptors)",
                              x->upstream->label, os_err ? strerror(os_err) : "out of memory");
                return r;
            }
            if (r != 0) {
                /* Refused on the spot (a unix socket nobody listens on, no route): as a
                 * refused connect, another upstream may take it. */
                refused(x, "refused the connection", r, os_err);
                if (x->tries < (int)x->site->nupstreams)
                    continue;
                return r;
            }
        }
        x->up = u;
        x->ustate->active++;
        arm_timer(x);
        moat_sock_read_start(&u->sock); /* a pooled one reads already: no event from here */
        int r = moat_sock_write(&u->sock, moat_buf_data(&x->head), moat_buf_size(&x->head));
        if (r == 0 && u->connected)
            moat__proxy_wait_unlink(x);
        else if (r == 0 && x->upstream->named)
            moat__proxy_dial_link(x); /* its name may move while it dials */
        if (r == 0)
            r = send_pending(x);
        if (r == 0)
            return 0;
        /* A pooled connection that broke while idle: try a fresh one. */
        int reused = x->reused;
        moat__proxy_release_upstream(x, 0);
        if (!reused || x->tries >= 3)
            return r;
    }
}

/* The exchange ends: give the upstream back or close it, tell the front end. */
void moat__proxy_complete(moat_exchange_t *x, int err)
{
    if (x->over)
        return;
    x->over = 1;
    moat__proxy_wait_unlink(x);
    int reusable = err == 0 && x->req_done && x->resp_done && x->up_keep_alive && !x->tunnel;
    moat__proxy_release_upstream(x, reusable);
    moat_metrics_t *m = x->w->metrics;
    if (m != NULL && x->upstream != NULL && x->t_first_byte) {
        unsigned slot = x->upstream->mslot;
        moat_mc_inc(&m->ups[slot].requests);
        moat_mc_inc(&m->ups[slot].lat[moat_metrics_lat_bucket(x->t_first_byte - x->t_start)]);
        moat_mc_set(&m->health[slot].last_ok_ms, x->t_first_byte);
    }
    moat_exchange_result_t res = {
        .status = x->status,
        .upstream = x->upstream ? x->upstream->label : "",
        .upstream_ms = x->t_first_byte ? x->t_first_byte - x->t_start : 0,
    };
    x->ops->done(x->front, err, &res);
    drop(x); /* the life reference; an event still running holds its own */
}

void moat__proxy_send_page(moat_exchange_t *x, int status, const char *body, const moat_header_t *h,
                           size_t n)
{
    size_t len = strlen(body);
    x->status = status;
    if (out_head(x, status, h, n, (int64_t)len, !x->head_req) == 0 &&
        (x->head_req || out_data(x, moat_slice(body, len)) == 0))
        out_end(x);
}

static void fail(moat_exchange_t *x, int status, const char *why)
{
    char w[320];
    MOAT_DEBUG("upstream %s: %s", moat__proxy_who(x, w, sizeof w), why);
    if (status && !x->resp_head_done) {
        x->resp_head_done = 1;
        x->resp_done = 1;
        /* The upstream connection is not reusable; the client's is, if the request body
         * was read whole. */
        x->up_keep_alive = 0;
        moat__proxy_send_page(x, status, moat_http_error_page(status), moat_http_page_headers,
                              MOAT_HTTP_PAGE_NHEADERS);
        moat__proxy_complete(x, 0);
        return;
    }
    moat__proxy_complete(x, MOAT_EUPSTREAM);
}

/* ---- upstream events (each runs under a reference: see hold/leave) ---- */

static void up_on_timeout(void *owner)
{
    moat_exchange_t *x = owner;
    moat__proxy_hold(x);
    if (!x->up->connected && x->slow_mark) {
        /* Slow to connect: the name may have moved (a vanished container's address gets no
         * answer). Look it up again; the dial goes on for the rest of connect_timeout. */
        x->slow_mark = 0;
        x->slow_kicked = 1;
        moat_resolver_kick();
        moat_upconn_set_timeout(x->up, x->connect_rest);
    } else if (!x->up->connected) {
        refused(x, "did not accept the connection in time", MOAT_ETIMEOUT, 0);
        int kept = moat__proxy_keep_unsent(x);
        moat__proxy_release_upstream(x, 0);
        if (kept != 0)
            fail(x, 502, "out of memory");
        else if (x->tries >= (int)x->site->nupstreams || moat__proxy_connect(x) != 0)
            moat__proxy_wait_or_fail(x, "connect timeout");
    } else if (x->tunnel) {
        fail(x, 0, "websocket idle timeout");
    } else {
        fail(x, 504, "upstream idle timeout");
    }
    moat__proxy_leave(x);
}

static void up_on_connect(void *owner, int err)
{
    moat_exchange_t *x = owner;
    moat__proxy_hold(x);
    if (err != 0) {
        refused(x, err == MOAT_ETLS ? "failed the TLS handshake" : "refused the connection", err,
                x->up->sock.connect_errno);
        /* Nothing reached the app yet (the body is kept in `pending`): another upstream may
         * take the request, or it waits for this one. */
        int kept = err == MOAT_ETLS ? 0 : moat__proxy_keep_unsent(x);
        moat__proxy_release_upstream(x, 0);
        int taken = kept == 0 && x->tries < (int)x->site->nupstreams && moat__proxy_connect(x) == 0;
        if (kept != 0)
            fail(x, 502, "out of memory");
        else if (!taken && err == MOAT_ETLS)
            fail(x, 502, "TLS handshake failed"); /* a certificate problem: waiting won't help */
        else if (!taken)
            moat__proxy_wait_or_fail(x, "connect failed");
    } else {
        moat__proxy_wait_unlink(x); /* the app is back for this one */
        arm_timer(x);
        if (send_pending(x) != 0)
            fail(x, 502, "cannot send the request body");
    }
    moat__proxy_leave(x);
}

static void up_on_read(void *owner)
{
    moat_exchange_t *x = owner;
    moat__proxy_hold(x);
    handle_response(x);
    moat__proxy_leave(x);
}

static void up_on_eof(void *owner, int err)
{
    moat_exchange_t *x = owner;
    moat__proxy_hold(x);
    if (x->tunnel) {
        MOAT_DEBUG("websocket: the upstream's side ended (%s)",
                   err ? moat_strerror(err) : "closed");
        if (err != 0) {
            moat__proxy_complete(x, err);
        } else {
            x->tunnel_up_eof = 1;
            out_end(x);
            if (x->tunnel_client_eof)
                moat__proxy_complete(x, 0);
        }
    } else if (x->resp_head_done && x->resp.kind == MOAT_BODY_UNTIL_CLOSE && err == 0) {
        handle_response(x); /* anything still buffered */
        if (!x->over) {
            x->resp_done = 1;
            out_end(x);
            moat__proxy_complete(x, 0);
        }
    } else if (!x->resp_started && x->idempotent && x->req_body == MOAT_REQ_BODY_NONE &&
               x->tries < 3 && (x->reused || x->site->site->upstream_wait_ms > 0)) {
        /* A pooled connection the app had already closed: retry on a fresh one. Or, when
         * requests may wait for the app, a fresh one it closed without an answer (an app
         * that stops drops the connections its listener had accepted): the retry then waits
         * for it. Only idempotent requests without a body, which may be sent twice. */
        moat__proxy_release_upstream(x, 0);
        char w[320];
        MOAT_DEBUG("upstream %s closed the connection before answering; retrying",
                   moat__proxy_who(x, w, sizeof w));
        if (moat__proxy_connect(x) != 0)
            moat__proxy_wait_or_fail(x, "cannot connect");
    } else {
        fail(x, 502, err ? "connection reset" : "connection closed before the response");
    }
    moat__proxy_leave(x);
}

static void up_on_drain(void *owner)
{
    moat_exchange_t *x = owner;
    if (x->client_paused) {
        x->client_paused = 0;
        x->ops->pause_body(x->front, 0);
    }
}

static const moat_upconn_cb_t up_cb = {
    .on_connect = up_on_connect,
    .on_read = up_on_read,
    .on_eof = up_on_eof,
    .on_drain = up_on_drain,
    .on_timeout = up_on_timeout,
};

/* ---- response relay ---- */

static size_t filter_response_headers(moat_exchange_t *x, const moat_http1_msg_t *m,
                                      moat_header_t *out, size_t cap)
{
    size_t n = 0;
    int have_hsts = 0;
    for (size_t i = 0; i < m->nheaders && n + 1 < cap; i++) {
        moat_slice_t name = m->headers[i].name;
        if (moat_slice_ieq(name, "content-length"))
            continue;
        if (m->status == 101 && moat_slice_ieq(name, "upgrade")) {
            out[n++] = m->headers[i];
            continue;
        }
        if (moat_http1_is_hop_by_hop(m, name))
            continue;
        if (moat_slice_ieq(name, "strict-transport-security"))
            have_hsts = 1;
        out[n++] = m->headers[i];
    }
    if (x->set_cookie && x->upstream != NULL && n + 1 < cap) {
        snprintf(x->cookie, sizeof x->cookie,
                 "moat_upstream=%08x; Path=/; HttpOnly; SameSite=Lax%s",
                 label_hash(x->upstream->label), x->tls ? "; Secure" : "");
        out[n++] = (moat_header_t){MOAT_SLICE_LIT("set-cookie"), moat_slice_str(x->cookie)};
    }
    if (x->hsts && !have_hsts && n < cap)
        out[n++] = (moat_header_t){MOAT_SLICE_LIT("strict-transport-security"),
                                   MOAT_SLICE_LIT("max-age=31536000")};
    return n;
}

/* Parse and relay the response head at the start of `in`. Returns 1 when a head was
 * handled (an interim one dropped, or the final one sent), 0 when more bytes are needed, or
 * a negative code. */
static int relay_head(moat_exchange_t *x, moat_slice_t in)
{
    moat_header_t hdrs[MAX_RESPONSE_HEADERS], out[MAX_RESPONSE_HEADERS];
    moat_http1_msg_t m;
    int r = moat_http1_parse_response(in.base, in.len, x->head_req, &m, hdrs, MAX_RESPONSE_HEADERS);
    if (r == MOAT_ENEED_MORE)
        return in.len > MOAT_HTTP1_MAX_HEAD ? MOAT_EPARSE : 0;
    if (r < 0)
        return r;
    if (!x->resp_started) {
        x->resp_started = 1;
        x->t_first_byte = uv_now(&x->w->loop);
        moat_buf_free(&x->head); /* no retry from here on */
    }
    if (m.status >= 100 && m.status < 200 && m.status != 101) {
        /* 100 Continue was answered by moat itself; other interim responses are dropped. */
        moat_sock_consume(&x->up->sock, (size_t)r);
        return 1;
    }
    if (m.status == 101 && !x->upgrade_req)
        return MOAT_EPARSE;
    x->status = m.status;
    x->up_keep_alive = m.keep_alive;
    size_t n = filter_response_headers(x, &m, out, MAX_RESPONSE_HEADERS);
    int64_t cl = m.body == MOAT_BODY_LENGTH ? (int64_t)m.content_length : -1;
    if (x->head_req && m.status >= 200 && m.status != 204 && m.status != 304) {
        /* A HEAD response keeps the length the GET would have: clients (download managers,
         * curl -I) read it. The parser vouched for the field's syntax. */
        moat_slice_t v = moat_http1_find_header(&m, "content-length");
        if (v.len > 0 && v.len < 19) {
            cl = 0;
            for (size_t i = 0; i < v.len; i++)
                cl = cl * 10 + (v.base[i] - '0');
        }
    }
    int has_body = m.body != MOAT_BODY_NONE && m.status != 101;
    x->resp_head_done = 1;
    /* "Content-Length: 0" (FastAPI's 307 redirects) is complete with the head: waiting for
     * body bytes would hold the response until the app closed its keep-alive. */
    moat_http1_body_init(&x->resp, m.status == 101 ? MOAT_BODY_UNTIL_CLOSE : m.body,
                         m.content_length);
    int e = out_head(x, m.status, out, n, has_body || x->head_req ? cl : -1, has_body);
    if (x->over)
        return MOAT_ECLOSED;
    moat_sock_consume(&x->up->sock, (size_t)r);
    if (e != 0)
        return e;
    if (m.status == 101) {
        x->tunnel = 1;
        if (x->w->metrics)
            moat_mc_inc(&x->w->metrics->conns[MOAT_MC_WS]);
        x->ops->upgraded(x->front);
        if (!x->over)
            arm_timer(x);
        return 1;
    }
    if (!has_body || (m.body == MOAT_BODY_LENGTH && m.content_length == 0))
        x->resp_done = 1;
    return 1;
}

/* Relay what the upstream sent: the head, then body bytes by their framing until the front
 * end's queue is full. */
static void handle_response(moat_exchange_t *x)
{
    moat_sock_t *s = &x->up->sock;
    arm_timer(x);
    while (!x->resp_head_done) {
        moat_slice_t in = moat_sock_input(s);
        if (in.len == 0)
            return;
        int r = relay_head(x, in);
        if (x->over)
            return;
        if (r == 0)
            return;
        if (r < 0) {
            fail(x, 502, "malformed response");
            return;
        }
    }
    int e = 0;
    while (!x->resp_done && e == 0) {
        moat_slice_t in = moat_sock_input(s);
        if (in.len == 0)
            break;
        size_t used = 0;
        moat_slice_t data = {0};
        int r = moat_http1_body_read(&x->resp, in.base, in.len, &used, &data);
        if (r < 0) {
            fail(x, 502, "malformed chunked body");
            return;
        }
        if (data.len)
            e = out_data(x, data);
        if (x->over)
            return;
        moat_sock_consume(s, used);
        if (r == 1)
            x->resp_done = 1;
        if (x->ops->queued(x->front) > MOAT_PROXY_HIGH_WATER) {
            /* The client is slower than the app: stop reading the app until it drains. */
            x->up_paused = 1;
            moat_sock_read_stop(s);
            break;
        }
    }
    if (e != 0) {
        moat__proxy_complete(x, e);
    } else if (x->resp_done) {
        out_end(x);
        moat__proxy_complete(x, 0);
    }
}

/* ---- the front end's calls ---- */

int moat_proxy_start(moat_worker_t *w, const moat_runtime_t *rt, const moat_site_rt_t *site,
                     const moat_request_t *req, const moat_front_ops_t *ops, void *front,
                     moat_exchange_t **out)
{
    moat_exchange_t *x = moat_mem_calloc(1, sizeof *x);
    if (x == NULL)
        return MOAT_ENOMEM;
    x->w = w;
    x->refs = 1;
    x->rt = rt;
    x->site = site;
    x->ops = ops;
    x->front = front;
    x->t_start = uv_now(&x->w->loop);
    x->head_req = moat_slice_eq(req->method, "HEAD");
    x->upgrade_req = req->upgrade;
    x->tls = req->tls;
    x->context = req->context;
    x->ctx = req->ctx;
    x->idempotent = is_idempotent(req->method);
    x->req_body = req->body;
    x->req_done = req->body == MOAT_REQ_BODY_NONE ||
                  (req->body == MOAT_REQ_BODY_LENGTH && req->content_length == 0);
    int hsts = site->site->hsts;
    if (hsts < 0) {
        /* Auto: only where the certificate is publicly trusted. An internal-CA site that
         * sent HSTS would lock browsers out once its root is no longer trusted. */
        int internal = site->site->tls == MOAT_TLS_INTERNAL;
        for (size_t i = 0; i < site->site->naddrs; i++)
            if (moat_host_is_internal(site->site->addrs[i].host))
                internal = 1;
        hsts =
            site->site->tls != MOAT_TLS_INTERNAL && !internal && site->site->tls != MOAT_TLS_AUTO;
    }
    x->hsts = hsts && req->tls;
    x->sticky = sticky_index(site, req);
    x->get_req = moat_slice_eq(req->method, "GET");
    x->starting = 1;
    int r = build_head(x, req);
    if (r == 0) {
        r = moat__proxy_connect(x);
        if (r != 0 && r != MOAT_ENOMEM) {
            moat__proxy_wait_or_fail(x, moat_strerror(r)); /* refused on the spot: as any refusal */
            r = 0;
        }
    }
    x->starting = 0;
    if (r != 0) {
        char w[320];
        MOAT_DEBUG("upstream %s: cannot connect (%s)", moat__proxy_who(x, w, sizeof w),
                   moat_strerror(r));
        drop(x);
        return r;
    }
    *out = x;
    return 0;
}

int moat_proxy_body(moat_exchange_t *x, moat_slice_t data)
{
    if (x->over || data.len == 0)
        return 0;
    int r;
    if (x->req_body == MOAT_REQ_BODY_STREAM) {
        char prefix[MOAT_HTTP1_CHUNK_PREFIX_MAX];
        moat_slice_t v[3] = {moat_slice(prefix, moat_http1_chunk_prefix(prefix, data.len)), data,
                             MOAT_SLICE_LIT("\r\n")};
        r = body_out(x, v, 3);
    } else {
        r = body_out(x, &data, 1);
    }
    if (r == 0 && body_queued(x) > MOAT_PROXY_HIGH_WATER)
        moat__proxy_pause_client(x);
    return r;
}

int moat_proxy_body_end(moat_exchange_t *x)
{
    if (x->over) {
        x->req_done = 1;
        return 0;
    }
    int r = 0;
    if (x->req_body == MOAT_REQ_BODY_STREAM) {
        moat_slice_t end = MOAT_SLICE_LIT("0\r\n\r\n");
        r = body_out(x, &end, 1);
    }
    x->req_done = 1;
    return r;
}

void moat_proxy_front_drained(moat_exchange_t *x)
{
    if (!x->up_paused || x->up == NULL)
        return;
    x->up_paused = 0;
    moat__proxy_hold(x);
    moat_sock_read_start(&x->up->sock);
    if (!x->over && x->up != NULL && moat_sock_input(&x->up->sock).len > 0)
        handle_response(x);
    moat__proxy_leave(x);
}

void moat_proxy_abort(moat_exchange_t *x)
{
    if (x->over)
        return;
    x->over = 1;
    moat__proxy_wait_unlink(x);
    moat__proxy_release_upstream(x, 0);
    drop(x);
}

int moat_proxy_tunnel_write(moat_exchange_t *x, moat_slice_t data)
{
    if (x->up == NULL)
        return MOAT_ECLOSED;
    arm_timer(x);
    int r = moat_sock_write(&x->up->sock, data.base, data.len);
    if (r == 0 && moat_sock_queued(&x->up->sock) > MOAT_PROXY_HIGH_WATER && !x->client_paused) {
        x->client_paused = 1;
        x->ops->pause_body(x->front, 1);
    }
    return r;
}

void moat_proxy_tunnel_client_eof(moat_exchange_t *x)
{
    x->tunnel_client_eof = 1;
    if (x->up != NULL)
        moat_sock_shutdown_after_flush(&x->up->sock);
    if (x->tunnel_up_eof)
        moat__proxy_complete(x, 0);
}
