/* HTTP/2 connections: the glue between a TLS socket, the sans-I/O session (http2/session.c)
 * and the front-end core (server/front.c). Every stream is a front end of its own
 * (moat_front_ops_t), exactly like an HTTP/1.1 connection, so admission, the proxy's
 * timeouts, headers, streaming and errors apply as is. What stays here is HTTP/2's own:
 * frames out through the socket, flow control, stream and connection state.
 *
 * Re-entrancy: every entry point (socket event, timer, proxy-driven flush) runs between
 * enter() and leave(); a close wanted inside only marks want_close, and leave() at depth 0
 * asks the owner to close. The memory goes when the handles' close callbacks have run. */
#include "front.h"
#include "h2conn.h"
#include "worker.h"

#include "moat/h2.h"
#include "moat/log.h"
#include "moat/mem.h"
#include "moat/tls.h"

#include <stdlib.h>

/* Above this many bytes in the socket's output queue, no more frames are produced (and the
 * client is not read) until it drains: the per-stream queues then fill and the proxy pauses
 * the upstreams. */
#define SOCK_HIGH_WATER (256 * 1024)
/* Frames smaller than this are gathered into one write (one TLS record). */
#define GATHER_MAX               4096
#define FIRST_REQUEST_TIMEOUT_MS 30000
#define DEFAULT_KEEPALIVE_MS     300000
/* After the last GOAWAY, how long the queued bytes get to leave before the close. */
#define CLOSE_FLUSH_MS 5000
/* A connection without streams for this long gives up its nghttp2 session until the client
 * speaks again (moat_h2_rest: ~9 KiB less per idle connection). Browsers keep connections
 * open for minutes after the last request; a client still busy with a page sends its next
 * request well within this. MOAT_H2_REST_MS changes it (tests rest connections at once). */
#define REST_AFTER_MS 5000

static uint64_t rest_after_ms = REST_AFTER_MS;

typedef struct stream stream_t;

struct stream {
    moat_front_t front; /* the request as the core sees it */
    moat_h2conn_t *c;
    int32_t id;
    stream_t *next, *prev;
    uint64_t bytes_in, bytes_out;
    size_t held;         /* request bytes given to the proxy but not yet to flow control (paused) */
    unsigned ws : 1;     /* RFC 8441 websocket */
    unsigned tunnel : 1; /* after the upstream's 101 */
    unsigned paused : 1; /* the proxy paused the request body */
    unsigned want_drain : 1; /* queued() said "above the high-water mark" */
};

struct moat_h2conn {
    moat_worker_t *w;
    moat_sock_t *sock;
    union {
        struct sockaddr_in in;
        struct sockaddr_in6 in6;
    } peer; /* TCP peers only (sockaddr_storage would be 100 bytes more per connection) */
    int port;
    const moat_h2conn_owner_t *owner;
    void *owner_data;
    moat_h2_t *h2;
    uv_timer_t timer;
    int depth; /* nesting of entry points: the owner is told to close only at depth 0 */
    stream_t *streams;
    moat_buf_t wbuf;
    uint64_t keepalive_ms;
    uint64_t timer_ms;           /* what the timer is armed for, 0 when stopped */
    moat_deferred_t flush_later; /* output from upstream events, written at the turn's end */
    unsigned freed : 1;
    unsigned want_close : 1;
    unsigned close_called : 1;
    unsigned close_after_flush : 1;
    unsigned blocked : 1;
    unsigned shutting : 1;
    unsigned seen_stream : 1;
    unsigned why_logged : 1;
    unsigned rest_due : 1;   /* the timer is armed for the rest, not the idle timeout */
    unsigned rest_tried : 1; /* this quiet spell already asked the session to rest */
};

static const moat_front_ops_t front_ops;
static void flush(moat_h2conn_t *c);

/* ---- entry points and lifetime ---- */

static void enter(moat_h2conn_t *c)
{
    c->depth++;
}

/* Leave an entry point; c may be freed on return. */
static void leave(moat_h2conn_t *c)
{
    if (--c->depth == 0 && c->want_close && !c->close_called && !c->freed) {
        c->close_called = 1;
        c->owner->close(c->owner_data);
    }
}

static void timer_closed(uv_handle_t *hd)
{
    free(hd->data);
}

/* Output the proxy produced from an upstream event goes out at the end of the loop turn,
 * together with what other streams got in the same turn (one write, not one per event);
 * inside an entry point the entry's own flush takes care of it. */
static void flush_later(moat_h2conn_t *c)
{
    if (c->depth > 0 || c->freed)
        return;
    moat_worker_defer(c->w, &c->flush_later);
}

static void on_flush_later(moat_deferred_t *d)
{
    moat_h2conn_t *c = MOAT_CONTAINER_OF(d, moat_h2conn_t, flush_later);
    enter(c);
    flush(c);
    leave(c);
}

/* ---- streams ---- */

static void stream_free(stream_t *st)
{
    moat_h2conn_t *c = st->c;
    if (st->prev)
        st->prev->next = st->next;
    else
        c->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    moat_mem_free(st);
}

static void *s_on_request(void *ud, int32_t id, const moat_h2_request_t *req)
{
    moat_h2conn_t *c = ud;
    stream_t *st = moat_mem_calloc(1, sizeof *st);
    if (st == NULL) {
        moat_h2_reset(c->h2, id, MOAT_H2_INTERNAL_ERROR);
        return NULL;
    }
    st->c = c;
    st->id = id;
    st->next = c->streams;
    if (c->streams)
        c->streams->prev = st;
    c->streams = st;
    c->seen_stream = 1;
    c->rest_tried = 0;
    st->bytes_in = req->head_bytes;
    moat_front_init(&st->front, c->w, &front_ops, st, (const struct sockaddr *)&c->peer, c->port,
                    1);
    st->front.stream_id = (uint32_t)id;
    moat_front_req_t r = {
        .method = req->method,
        .target = req->path,
        .authority = req->authority,
        .protocol = req->protocol,
        .headers = req->headers,
        .nheaders = req->nheaders,
        .content_length = req->content_length > 0 ? (uint64_t)req->content_length : 0,
        .proto = "HTTP/2",
    };
    if (req->end_stream || req->content_length == 0)
        r.body = MOAT_REQ_BODY_NONE;
    else if (req->content_length > 0)
        r.body = MOAT_REQ_BODY_LENGTH;
    else
        r.body = MOAT_REQ_BODY_STREAM;
    if (moat_front_start(&st->front, &r) == MOAT_FRONT_PROXYING) {
        st->ws = moat_slice_eq(req->method, "CONNECT");
        c->keepalive_ms = st->front.site->site->keepalive_timeout_ms;
    }
    return st;
}

static void s_on_data(void *ud, void *stream, int32_t id, moat_slice_t data)
{
    moat_h2conn_t *c = ud;
    stream_t *st = stream;
    if (st != NULL)
        st->bytes_in += data.len;
    if (st == NULL || st->front.x == NULL || (st->ws && !st->tunnel)) {
        /* Nobody takes these bytes: give the window back, drop them. */
        moat_h2_consume(c->h2, id, data.len);
        return;
    }
    int responded = st->front.responded;
    int r =
        st->tunnel ? moat_proxy_tunnel_write(st->front.x, data) : moat_front_body(&st->front, data);
    if (r != 0) {
        moat_h2_consume(c->h2, id, data.len);
        if (r == MOAT_ETOO_LARGE && !responded)
            return; /* the core answered 413 */
        moat_front_abort(&st->front);
        moat_h2_reset(c->h2, id, MOAT_H2_INTERNAL_ERROR);
        return;
    }
    /* The stream window opens again only as fast as the upstream takes the bytes. */
    if (st->paused)
        st->held += data.len;
    else
        moat_h2_consume(c->h2, id, data.len);
}

static void s_on_end(void *ud, void *stream, int32_t id)
{
    (void)ud, (void)id;
    stream_t *st = stream;
    if (st == NULL || st->front.x == NULL)
        return;
    if (st->tunnel)
        moat_proxy_tunnel_client_eof(st->front.x); /* may complete the exchange (fo_done) */
    else if (!st->ws)
        moat_front_body_end(&st->front);
}

static void s_on_close(void *ud, void *stream, int32_t id, uint32_t code)
{
    (void)ud;
    stream_t *st = stream;
    if (st == NULL)
        return;
    if (st->front.x != NULL)
        MOAT_DEBUG("h2 stream %d closed with error %u before the response ended", (int)id, code);
    moat_front_abort(&st->front); /* the client reset it mid-exchange: logged as 499 */
    stream_free(st);
}

static const moat_h2_cb_t session_cb = {
    .on_request = s_on_request,
    .on_data = s_on_data,
    .on_end = s_on_end,
    .on_close = s_on_close,
};

/* ---- the front-end ops (the proxy and the core call them) ---- */

static int fo_send_head(void *front, int status, const moat_header_t *h, size_t n,
                        int64_t content_length, int has_body)
{
    stream_t *st = front;
    moat_h2_t *h2 = st->c->h2;
    moat_header_t hdrs[128];
    if (st->ws && status == 101) {
        /* RFC 8441: the switch is a 200 on the stream; the HTTP/1.1 handshake fields stay
         * behind (upgrade and connection are dropped by the session as HTTP/2-forbidden). */
        size_t k = 0;
        for (size_t i = 0; i < n && k < MOAT_ARRAY_LEN(hdrs); i++)
            if (!moat_slice_ieq(h[i].name, "sec-websocket-accept"))
                hdrs[k++] = h[i];
        h = hdrs;
        n = k;
        status = 200;
        has_body = 1;
        content_length = -1;
    }
    st->front.responded = 1;
    /* An error answer while the request body is still arriving (413, a 502 after
     * upstream_wait, an app refusing an upload early): the rest of the body is read and
     * dropped rather than refused with RST_STREAM, which RFC 9113 §8.1 allows but which curl
     * and some other clients report as a failed transfer instead of showing the answer. */
    if (status >= 400)
        moat_h2_drain_body(h2, st->id);
    int r = moat_h2_respond(h2, st->id, status, h, n, content_length, has_body);
    if (r != 0)
        moat_h2_reset(h2, st->id, MOAT_H2_INTERNAL_ERROR);
    return r;
}

static int fo_send_data(void *front, moat_slice_t data)
{
    stream_t *st = front;
    st->bytes_out += data.len;
    return moat_h2_send_data(st->c->h2, st->id, data);
}

static int fo_send_end(void *front)
{
    stream_t *st = front;
    return moat_h2_send_end(st->c->h2, st->id);
}

static size_t fo_queued(void *front)
{
    stream_t *st = front;
    size_t q = moat_h2_stream_queued(st->c->h2, st->id);
    if (q > MOAT_PROXY_HIGH_WATER)
        st->want_drain = 1; /* flush() wakes the upstream when the queue drains */
    return q;
}

static void fo_counts(void *front, uint64_t *in, uint64_t *out)
{
    stream_t *st = front;
    *in = st->bytes_in;
    *out = st->bytes_out;
}

static void fo_flush(void *front)
{
    stream_t *st = front;
    flush_later(st->c);
}

static void fo_pause_body(void *front, int pause)
{
    stream_t *st = front;
    st->paused = pause != 0;
    if (!pause && st->held) {
        moat_h2_consume(st->c->h2, st->id, st->held);
        st->held = 0;
        flush_later(st->c); /* the WINDOW_UPDATE */
    }
}

static void fo_upgraded(void *front)
{
    stream_t *st = front;
    st->tunnel = 1;
}

static void fo_done(void *front, int err, const moat_exchange_result_t *res)
{
    stream_t *st = front;
    moat_h2conn_t *c = st->c;
    moat_exchange_result_t r = *res;
    if (st->ws && r.status == 101)
        r.status = 0; /* the client saw a 200 */
    moat_front_finish(&st->front, &r);
    if (err != 0) {
        /* The response was cut: the client must see a reset, not a short body that looks
         * whole. */
        moat_h2_reset(c->h2, st->id, MOAT_H2_INTERNAL_ERROR);
    } else if (st->held) {
        moat_h2_consume(c->h2, st->id, st->held);
        st->held = 0;
    }
    flush_later(c);
}

static const moat_front_ops_t front_ops = {
    .send_head = fo_send_head,
    .send_data = fo_send_data,
    .send_end = fo_send_end,
    .queued = fo_queued,
    .pause_body = fo_pause_body,
    .upgraded = fo_upgraded,
    .flush = fo_flush,
    .counts = fo_counts,
    .done = fo_done,
};

/* ---- output ---- */

static int write_out(moat_h2conn_t *c, moat_slice_t s)
{
    if (moat_sock_write(c->sock, s.base, s.len) != 0) {
        c->want_close = 1;
        return -1;
    }
    return 0;
}

static int write_wbuf(moat_h2conn_t *c)
{
    if (moat_buf_size(&c->wbuf) == 0)
        return 0;
    int r = write_out(c, moat_slice(moat_buf_data(&c->wbuf), moat_buf_size(&c->wbuf)));
    moat_buf_reset(&c->wbuf);
    return r;
}

static void timer_cb(uv_timer_t *t);

static void arm_timer(moat_h2conn_t *c, uint64_t ms)
{
    if (c->timer_ms == ms)
        return;
    c->timer_ms = ms;
    if (ms)
        uv_timer_start(&c->timer, timer_cb, ms, 0);
    else
        uv_timer_stop(&c->timer);
}

/* Run the session's output into the socket until it has nothing more or the socket's queue
 * is full; wake paused upstreams whose stream queues drained; decide about closing. */
static void flush(moat_h2conn_t *c)
{
    if (c->freed || c->want_close)
        return;
    for (int round = 0; round < 64; round++) {
        for (;;) {
            if (moat_sock_queued(c->sock) > SOCK_HIGH_WATER) {
                /* Wait for on_drain; stop reading too, so a client that does not read
                 * cannot make us queue answers (PING/SETTINGS ACKs) without bound. */
                c->blocked = 1;
                moat_sock_read_stop(c->sock);
                break;
            }
            moat_slice_t out;
            if (moat_h2_send(c->h2, &out) != 0) {
                c->want_close = 1;
                return;
            }
            if (out.len == 0)
                break;
            if (out.len >= GATHER_MAX) {
                if (write_wbuf(c) != 0 || write_out(c, out) != 0)
                    return;
            } else {
                if (moat_buf_size(&c->wbuf) + out.len > 16384 && write_wbuf(c) != 0)
                    return;
                if (moat_buf_append(&c->wbuf, out.base, out.len) != 0) {
                    c->want_close = 1;
                    return;
                }
            }
        }
        if (write_wbuf(c) != 0)
            return;
        /* Streams whose queue fell well below the mark get their upstream read again. Their
         * new bytes are framed in the next round. */
        int woke = 0;
        for (stream_t *st = c->streams, *next; st != NULL; st = next) {
            next = st->next;
            if (st->want_drain && st->front.x != NULL &&
                moat_h2_stream_queued(c->h2, st->id) <= MOAT_PROXY_HIGH_WATER / 2) {
                st->want_drain = 0;
                moat_proxy_front_drained(st->front.x);
                woke = 1;
            }
        }
        if (!woke)
            break;
    }
    if (moat_h2_open_streams(c->h2) == 0 && moat_buf_size(&c->wbuf) == 0)
        moat_buf_free(&c->wbuf);
    int over = !moat_h2_want_read(c->h2) && !moat_h2_want_write(c->h2);
    if (c->shutting && moat_h2_open_streams(c->h2) == 0 && !moat_h2_want_write(c->h2))
        over = 1;
    if (over)
        c->close_after_flush = 1;
    if (c->close_after_flush) {
        if (moat_sock_queued(c->sock) == 0)
            c->want_close = 1;
        else
            arm_timer(c, CLOSE_FLUSH_MS);
        return;
    }
    if (moat_h2_open_streams(c->h2) > 0) {
        c->rest_due = 0;
        arm_timer(c, 0);
        return;
    }
    /* Quiet: first the rest, then the idle timeout (counted from the same moment). */
    uint64_t idle = c->seen_stream ? c->keepalive_ms : FIRST_REQUEST_TIMEOUT_MS;
    c->rest_due = !c->rest_tried && rest_after_ms < idle;
    if (c->rest_due)
        arm_timer(c, rest_after_ms ? rest_after_ms : 1);
    else
        arm_timer(c, c->rest_tried && idle > rest_after_ms ? idle - rest_after_ms : idle);
}

static void timer_cb(uv_timer_t *t)
{
    moat_h2conn_t *c = t->data;
    c->timer_ms = 0;
    if (c->freed)
        return;
    enter(c);
    if (c->close_after_flush) {
        c->want_close = 1; /* the client is not reading its last frames */
    } else if (c->rest_due) {
        c->rest_due = 0;
        c->rest_tried = 1;
        if (moat_h2_rest(c->h2))
            MOAT_DEBUG("h2 connection at rest");
        flush(c); /* the empty HPACK table it may ask for; arms the idle timeout */
    } else if (moat_h2_open_streams(c->h2) == 0) {
        MOAT_DEBUG("h2 connection idle: GOAWAY");
        moat_h2_terminate(c->h2, MOAT_H2_NO_ERROR, "idle");
        c->close_after_flush = 1;
        flush(c);
    }
    leave(c);
}

/* ---- public ---- */

void moat_h2conn_init(void)
{
    static const char *const protos[] = {"h2", "http/1.1"};
    moat_tls_set_alpn(protos, MOAT_ARRAY_LEN(protos));
    const char *ms = getenv("MOAT_H2_REST_MS");
    if (ms != NULL && *ms)
        rest_after_ms = strtoull(ms, NULL, 10);
}

moat_h2conn_t *moat_h2conn_new(moat_worker_t *w, moat_sock_t *sock, const struct sockaddr *peer,
                               int port, const moat_h2conn_owner_t *owner, void *owner_data)
{
    moat_h2conn_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->w = w;
    c->sock = sock;
    c->port = port;
    c->owner = owner;
    c->owner_data = owner_data;
    c->keepalive_ms = DEFAULT_KEEPALIVE_MS;
    c->flush_later.run = on_flush_later;
    memcpy(&c->peer, peer,
           peer->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    /* Advertise RFC 8441 only when some site accepts websockets over HTTP/2. */
    moat_runtime_t *rt = moat_worker_runtime_acquire(w);
    int ws = 0;
    for (size_t i = 0; rt != NULL && i < rt->nsites; i++)
        if (rt->sites[i].site->h2_websocket)
            ws = 1;
    if (rt != NULL)
        c->keepalive_ms = rt->keepalive_timeout_ms;
    moat_worker_runtime_release(w, rt);
    moat_h2_settings_t set = {.enable_connect_protocol = ws};
    c->h2 = moat_h2_new(&set, &session_cb, c);
    if (c->h2 == NULL) {
        free(c);
        return NULL;
    }
    uv_timer_init(&w->loop, &c->timer);
    c->timer.data = c;
    arm_timer(c, FIRST_REQUEST_TIMEOUT_MS);
    return c;
}

void moat_h2conn_on_read(moat_h2conn_t *c)
{
    if (c->freed)
        return;
    enter(c);
    moat_slice_t in = moat_sock_input(c->sock);
    if (in.len > 0 && !c->want_close) {
        if (moat_h2_at_rest(c->h2))
            MOAT_DEBUG("h2 connection wakes");
        ssize_t r = moat_h2_recv(c->h2, in.base, in.len, uv_now(&c->w->loop));
        moat_sock_consume(c->sock, in.len);
        if (moat_h2_at_rest(c->h2))
            MOAT_DEBUG("h2 connection at rest"); /* the client ACKed the empty HPACK table */
        if (r < 0) {
            /* Try to get the GOAWAY out before closing (not after a flood: the queue is
             * what the attacker filled). */
            if (!moat_h2_flooded(c->h2))
                flush(c);
            c->want_close = 1;
        }
    }
    flush(c);
    if (*moat_h2_why(c->h2) && !c->why_logged) {
        c->why_logged = 1;
        MOAT_INFO("h2 connection ending: %s", moat_h2_why(c->h2));
    }
    leave(c);
}

void moat_h2conn_on_drain(moat_h2conn_t *c)
{
    if (c->freed)
        return;
    enter(c);
    if (c->blocked) {
        c->blocked = 0;
        if (!c->close_after_flush)
            moat_sock_read_start(c->sock);
    }
    flush(c);
    leave(c);
}

void moat_h2conn_on_eof(moat_h2conn_t *c, int err)
{
    (void)err;
    if (c->freed)
        return;
    enter(c);
    c->want_close = 1;
    leave(c);
}

void moat_h2conn_shutdown(moat_h2conn_t *c)
{
    if (c->freed)
        return;
    enter(c);
    if (!c->shutting) {
        c->shutting = 1;
        moat_h2_goaway(c->h2);
    }
    flush(c);
    leave(c);
}

void moat_h2conn_free(moat_h2conn_t *c)
{
    if (c == NULL || c->freed)
        return;
    c->freed = 1;
    moat_worker_undefer(c->w, &c->flush_later);
    for (stream_t *st = c->streams, *next; st != NULL; st = next) {
        next = st->next;
        moat_front_abort(&st->front);
        moat_mem_free(st);
    }
    c->streams = NULL;
    moat_h2_free(c->h2);
    c->h2 = NULL;
    moat_buf_free(&c->wbuf);
    uv_close((uv_handle_t *)&c->timer, timer_closed);
}
