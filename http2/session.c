/* The sans-I/O HTTP/2 server session (include/moat/h2.h) on nghttp2 1.52. */
#include "moat/h2.h"
#include "moat/mem.h"

#include <nghttp2/nghttp2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Glitch budget: a token bucket. Legitimate clients cancel a stream now and then (a browser
 * navigating away); an attacker resetting thousands per second (CVE-2023-44487) or sending
 * invalid frames drains it and gets GOAWAY ENHANCE_YOUR_CALM. nghttp2's own reset limit
 * (1000 burst, 33/s, GOAWAY INTERNAL_ERROR) stays as a backstop. */
#define GLITCH_BURST   400
#define GLITCH_PER_SEC 100
/* SETTINGS and PING frames from the client (each costs us an ACK). */
#define CONTROL_BURST   1000
#define CONTROL_PER_SEC 200
/* CONTINUATION frames per header block (CVE-2024-27316/28182): 64 KiB of headers fit in
 * the HEADERS frame plus 4 CONTINUATIONs at the default frame size. */
#define MAX_CONTINUATIONS 8
/* Per-field overhead RFC 9113 §6.5.2 counts in the header list size. */
#define FIELD_OVERHEAD 32
/* How many of the latest client stream ids keep a record once nghttp2 has forgotten their
 * stream (see judge_frame). Two bits each; as many as the streams a client may have open. */
#define RECENT_IDS 128
#define FRAME_HD   9
/* The client's settings a rested connection keeps (see "rest"). */
#define NREMOTE 6

typedef struct h2s h2s_t;

/* A request stream: its header bytes while the head arrives, then the queued response. */
struct h2s {
    int32_t id;
    void *data; /* the owner's, from on_request */
    h2s_t *next, *prev;
    moat_buf_t hb;  /* header fields while they arrive: [u32 nlen][u32 vlen][name][value] */
    size_t hsize;   /* header list size so far (RFC 9113 §6.5.2) */
    moat_buf_t out; /* response body bytes not yet framed */
    unsigned dispatched : 1; /* on_request was called */
    unsigned req_ended : 1;  /* the client sent END_STREAM */
    unsigned responded : 1;  /* HEADERS submitted */
    unsigned has_body : 1;   /* a data provider is attached */
    unsigned out_end : 1;    /* send_end was called */
    unsigned deferred : 1;   /* the provider returned NGHTTP2_ERR_DEFERRED */
    unsigned too_big : 1;    /* header list over the limit: ignored and reset */
    unsigned malformed : 1;  /* a field nghttp2 would silently drop: reset instead */
    unsigned drain_body : 1; /* read the rest of the request body after the response */
};

typedef struct {
    double tokens;
    uint64_t last_ms;
} bucket_t;

/* What is known of a closed client stream (RFC 9113 §5.1), by who closed which side. */
enum {
    ID_SKIPPED = 0,    /* never opened: a lower id than one in use, closed implicitly */
    ID_OPENED = 1,     /* neither ended nor reset by the client: once closed, moat closed it
                        * first and frames still in flight are ignored */
    ID_PEER_ENDED = 2, /* the client sent END_STREAM: anything more is a connection error */
    ID_PEER_RESET = 3, /* the client sent RST_STREAM: anything more is a stream error */
};

struct moat_h2 {
    nghttp2_session *s;
    const moat_h2_cb_t *cb;
    void *ud;
    h2s_t *streams;
    size_t nstreams;
    uint32_t max_header_list;
    uint64_t now_ms;
    bucket_t glitch, control;
    const char *why;
    /* Frame boundaries in the client's bytes: how many belong to the current frame (or the
     * preface) before the next frame header, and that header while it arrives. */
    size_t skip;
    uint8_t hd[FRAME_HD];
    uint8_t nhd;
    int32_t max_id;                       /* highest client stream id a HEADERS named, or -1 */
    uint64_t recent[RECENT_IDS * 2 / 64]; /* ID_* of the ids in (max_id - 2*RECENT_IDS, max_id] */
    /* What a fresh session needs to take over a rested connection (see "rest"). */
    uint32_t max_streams, stream_window;
    uint32_t remote[NREMOTE]; /* the client's SETTINGS, while at rest */
    int32_t remote_window;    /* the client's connection window for us, while at rest */
    uint16_t settings_sent, settings_acked; /* our SETTINGS frames, and the client's ACKs */
    uint8_t table;                          /* TABLE_*: the client's HPACK encoder table */
    unsigned connect_protocol : 1;
    unsigned in_block : 1;    /* a header block's CONTINUATION frames are due */
    unsigned rest_wanted : 1; /* rest as soon as the client ACKs the empty table */
    unsigned restoring : 1;   /* replaying the connection into a fresh session */
    unsigned goaway : 1;
    unsigned terminated : 1;
    unsigned flooded : 1;
    unsigned creating : 1;     /* inside nghttp2_session_server_new3 */
    unsigned shares_frame : 1; /* nghttp2's frame buffer is the thread's shared one */
};

enum {
    TABLE_IN_USE,   /* the client may index header fields */
    TABLE_EMPTYING, /* SETTINGS_HEADER_TABLE_SIZE 0 sent, not yet ACKed */
    TABLE_EMPTY,    /* ACKed: the client's table is empty and stays so (RFC 7541 §4.2) */
};

/* ---- memory ----
 *
 * An idle nghttp2 server session holds ~25 KiB, and 16 KiB of it is one buffer: the chunk
 * that outgoing frames are serialized into (its "framebufs" head, allocated with the session
 * and kept for its life). Its bytes only matter from the moment a frame is serialized to the
 * moment nghttp2_session_mem_send hands them out, and moat_h2_send's caller copies them away
 * (to the socket or its gather buffer) before anything else runs on the thread. So every
 * session of a thread gets the same chunk, the way nginx and h2o keep one output buffer per
 * worker rather than per connection. Only that first chunk is shared: the extra chunks a header
 * block over 16 KiB needs are the session's own, since they are handed out over several
 * mem_send calls. tests/unit/h2_test.c (test_shared_frame_buffer) interleaves sessions to
 * hold nghttp2 to it. */

/* nghttp2's NGHTTP2_FRAMEBUF_CHUNKLEN: frame header, one pad-length byte, 16 KiB of payload.
 * It is requested once while the session is created; nothing else asks for this size then. */
#define FRAMEBUF_CHUNK (9 + 1 + 16384)

static _Thread_local void *shared_frame;
static _Thread_local size_t shared_frame_users;

static void *mem_malloc(size_t n, void *ud)
{
    (void)ud;
    return moat_mem_alloc(n);
}

static void mem_free(void *p, void *ud)
{
    moat_h2_t *h = ud;
    if (p != NULL && p == shared_frame && h->shares_frame) {
        h->shares_frame = 0;
        if (--shared_frame_users == 0) {
            free(shared_frame); /* a worker with no HTTP/2 connection holds none */
            shared_frame = NULL;
        }
        return;
    }
    moat_mem_free(p);
}

static void *mem_calloc(size_t n, size_t size, void *ud)
{
    (void)ud;
    return moat_mem_calloc(n, size);
}

static void *mem_realloc(void *p, size_t n, void *ud)
{
    moat_h2_t *h = ud;
    if (p == NULL && n == FRAMEBUF_CHUNK && h->creating && !h->shares_frame) {
        if (shared_frame == NULL && (shared_frame = malloc(FRAMEBUF_CHUNK)) == NULL)
            return NULL;
        shared_frame_users++;
        h->shares_frame = 1;
        return shared_frame;
    }
    if (p != NULL && p == shared_frame && h->shares_frame) {
        /* nghttp2 does not grow its chunks; should it, the session gets a copy of its own. */
        void *q = malloc(n);
        if (q == NULL)
            return NULL;
        memcpy(q, p, MOAT_MIN(n, (size_t)FRAMEBUF_CHUNK));
        mem_free(p, ud);
        return q;
    }
    return moat_mem_realloc(p, n);
}

static int bucket_take(bucket_t *b, uint64_t now, double burst, double per_sec)
{
    if (now > b->last_ms) {
        b->tokens += (double)(now - b->last_ms) * per_sec / 1000.0;
        if (b->tokens > burst)
            b->tokens = burst;
        b->last_ms = now;
    }
    if (b->tokens < 1.0)
        return -1;
    b->tokens -= 1.0;
    return 0;
}

static int wake(moat_h2_t *h);

void moat_h2_terminate(moat_h2_t *h, uint32_t error_code, const char *why)
{
    if (h->terminated || (h->s == NULL && wake(h) != 0))
        return;
    h->terminated = 1;
    h->why = why;
    nghttp2_session_terminate_session(h->s, error_code);
}

static void glitch(moat_h2_t *h, const char *why)
{
    if (bucket_take(&h->glitch, h->now_ms, GLITCH_BURST, GLITCH_PER_SEC) != 0)
        moat_h2_terminate(h, NGHTTP2_ENHANCE_YOUR_CALM, why);
}

static h2s_t *stream_of(moat_h2_t *h, int32_t id)
{
    return h->s ? nghttp2_session_get_stream_user_data(h->s, id) : NULL; /* at rest: none */
}

static void stream_free(moat_h2_t *h, h2s_t *st)
{
    if (st->prev)
        st->prev->next = st->next;
    else
        h->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    h->nstreams--;
    moat_buf_free(&st->hb);
    moat_buf_free(&st->out);
    moat_mem_free(st);
}

/* ---- closed streams (RFC 9113 §5.1) ----
 *
 * nghttp2 keeps no state for closed streams here (no_closed_streams, so memory follows the
 * open streams only) and silently drops every frame for a stream it no longer knows. That is
 * right after moat reset a stream or ended it while the client was still sending (the
 * client's frames were in flight), but RFC 9113 wants errors when the client itself had
 * ended or reset the stream, or names a lower id than one it already used. A proxy answers
 * fast, so without a record the stream is often gone before the bad frame arrives. Two bits
 * for each of the latest RECENT_IDS client ids keep that record; older ids are ignored, as
 * nghttp2 would. */

static unsigned id_state(const moat_h2_t *h, int32_t id)
{
    unsigned slot = ((uint32_t)id >> 1) % RECENT_IDS * 2;
    return (unsigned)(h->recent[slot / 64] >> (slot % 64)) & 3;
}

static void set_id_state(moat_h2_t *h, int32_t id, unsigned v)
{
    if (id > h->max_id || (int64_t)h->max_id - id >= 2 * RECENT_IDS)
        return;
    unsigned slot = ((uint32_t)id >> 1) % RECENT_IDS * 2;
    h->recent[slot / 64] =
        (h->recent[slot / 64] & ~((uint64_t)3 << (slot % 64))) | (uint64_t)v << (slot % 64);
}

/* A HEADERS frame names a new client stream: the ids skipped on the way are closed. */
static void id_opened(moat_h2_t *h, int32_t id)
{
    if ((int64_t)id - h->max_id >= 2 * RECENT_IDS) {
        memset(h->recent, 0, sizeof h->recent);
    } else {
        for (int64_t i = (int64_t)h->max_id + 2; i < id; i += 2)
            set_id_state(h, (int32_t)i, ID_SKIPPED); /* the slot held an id 2*RECENT_IDS older */
    }
    h->max_id = id;
    set_id_state(h, id, ID_OPENED);
}

/* A frame header is complete and nghttp2 has processed every frame before it: judge a DATA or
 * HEADERS frame for a client stream nghttp2 no longer knows. Streams it knows (open or
 * half-closed) follow nghttp2's own rules. */
static void judge_frame(moat_h2_t *h, uint8_t type, int32_t id)
{
    if ((type != NGHTTP2_DATA && type != NGHTTP2_HEADERS) || !(id & 1) || h->terminated ||
        !nghttp2_session_want_read(h->s))
        return;
    if (id > h->max_id) {
        if (type == NGHTTP2_HEADERS)
            id_opened(h, id);
        return; /* DATA on an idle stream: nghttp2's connection error */
    }
    if (nghttp2_session_find_stream(h->s, id) != NULL || (int64_t)h->max_id - id >= 2 * RECENT_IDS)
        return;
    switch (id_state(h, id)) {
    case ID_SKIPPED:
        if (type == NGHTTP2_HEADERS)
            moat_h2_terminate(h, NGHTTP2_PROTOCOL_ERROR,
                              "HEADERS with a stream id lower than a previous one");
        else
            moat_h2_terminate(h, NGHTTP2_STREAM_CLOSED, "DATA on a closed stream");
        return;
    case ID_PEER_ENDED:
        moat_h2_terminate(h, NGHTTP2_STREAM_CLOSED, "frame on a stream after its END_STREAM");
        return;
    case ID_PEER_RESET:
        /* A stream error; nghttp2 then drops the frame (a header block still goes through
         * the decoder, whose table must stay in sync). */
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, id, NGHTTP2_STREAM_CLOSED);
        glitch(h, "frames on streams the client reset");
        return;
    default: return; /* ID_OPENED: moat closed it first, the frame was in flight */
    }
}

/* ---- nghttp2 callbacks ---- */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    moat_h2_t *h = ud;
    (void)s;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST || h->restoring)
        return 0;
    h->rest_wanted = 0; /* busy again: the owner asks anew when it is quiet */
    h2s_t *st = moat_mem_calloc(1, sizeof *st);
    if (st == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    st->id = f->hd.stream_id;
    st->next = h->streams;
    if (h->streams)
        h->streams->prev = st;
    h->streams = st;
    h->nstreams++;
    nghttp2_session_set_stream_user_data(h->s, st->id, st);
    return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *ud)
{
    moat_h2_t *h = ud;
    (void)s, (void)flags;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* trailers are not forwarded: the HTTP/1.1 upstream gets none */
    h2s_t *st = stream_of(h, f->hd.stream_id);
    if (st == NULL || st->too_big || st->malformed)
        return 0;
    st->hsize += namelen + valuelen + FIELD_OVERHEAD;
    if (st->hsize > h->max_header_list) {
        /* An HPACK bomb decodes tiny input into a huge list: stop storing at the limit and
         * reset the stream; the decoder still runs (its table must stay in sync) but costs
         * no memory. */
        st->too_big = 1;
        moat_buf_free(&st->hb);
        glitch(h, "header list too large");
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    uint32_t lens[2] = {(uint32_t)namelen, (uint32_t)valuelen};
    if (moat_buf_append(&st->hb, lens, sizeof lens) != 0 ||
        moat_buf_append(&st->hb, name, namelen) != 0 ||
        moat_buf_append(&st->hb, value, valuelen) != 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

/* Parse the stored fields into a request and hand it to the owner. */
static int dispatch(moat_h2_t *h, h2s_t *st, int end_stream)
{
    moat_h2_request_t req = {
        .content_length = -1, .end_stream = end_stream, .head_bytes = st->hsize};
    size_t nfields = 0, ncookies = 0, cookie_len = 0;
    const char *p = moat_buf_data(&st->hb), *end = p + moat_buf_size(&st->hb);
    for (const char *q = p; q < end;) {
        uint32_t l[2];
        memcpy(l, q, sizeof l);
        const char *n = q + sizeof l;
        nfields++;
        if (l[0] == 6 && memcmp(n, "cookie", 6) == 0) {
            ncookies++;
            cookie_len += l[1] + 2;
        }
        q = n + l[0] + l[1];
    }
    moat_header_t *hdrs = moat_mem_alloc((nfields + 1) * sizeof *hdrs);
    char *cookie = ncookies > 1 ? moat_mem_alloc(cookie_len) : NULL;
    if (hdrs == NULL || (ncookies > 1 && cookie == NULL)) {
        moat_mem_free(hdrs);
        moat_mem_free(cookie);
        return -1;
    }
    size_t nh = 0, clen = 0;
    int cookie_slot = -1;
    for (const char *q = p; q < end;) {
        uint32_t l[2];
        memcpy(l, q, sizeof l);
        moat_slice_t name = moat_slice(q + sizeof l, l[0]);
        moat_slice_t value = moat_slice(name.base + l[0], l[1]);
        q = value.base + l[1];
        if (name.len && name.base[0] == ':') {
            if (moat_slice_eq(name, ":method"))
                req.method = value;
            else if (moat_slice_eq(name, ":scheme"))
                req.scheme = value;
            else if (moat_slice_eq(name, ":authority"))
                req.authority = value;
            else if (moat_slice_eq(name, ":path"))
                req.path = value;
            else if (moat_slice_eq(name, ":protocol"))
                req.protocol = value;
            continue;
        }
        if (moat_slice_eq(name, "content-length")) {
            /* nghttp2 checked it is one valid number. */
            uint64_t v = 0;
            for (size_t i = 0; i < value.len; i++)
                v = v * 10 + (uint64_t)(value.base[i] - '0');
            req.content_length = (int64_t)v;
        }
        if (ncookies > 1 && moat_slice_eq(name, "cookie")) {
            if (clen) {
                memcpy(cookie + clen, "; ", 2);
                clen += 2;
            }
            memcpy(cookie + clen, value.base, value.len);
            clen += value.len;
            if (cookie_slot >= 0)
                continue;
            cookie_slot = (int)nh;
        }
        hdrs[nh++] = (moat_header_t){name, value};
    }
    if (cookie_slot >= 0)
        hdrs[cookie_slot].value = moat_slice(cookie, clen);
    if (req.authority.len == 0)
        for (size_t i = 0; i < nh; i++)
            if (moat_slice_eq(hdrs[i].name, "host"))
                req.authority = hdrs[i].value;
    req.headers = hdrs;
    req.nheaders = nh;
    st->dispatched = 1;
    st->data = h->cb->on_request(h->ud, st->id, &req);
    moat_mem_free(hdrs);
    moat_mem_free(cookie);
    moat_buf_free(&st->hb);
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    moat_h2_t *h = ud;
    if (h->restoring)
        return 0;
    int es = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (es && (f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA))
        set_id_state(h, f->hd.stream_id, ID_PEER_ENDED);
    switch (f->hd.type) {
    case NGHTTP2_HEADERS: {
        h2s_t *st = stream_of(h, f->hd.stream_id);
        if (st == NULL || st->too_big)
            return 0;
        if (f->headers.cat == NGHTTP2_HCAT_REQUEST) {
            if (st->malformed) {
                nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_PROTOCOL_ERROR);
                return 0;
            }
            if (es)
                st->req_ended = 1;
            if (dispatch(h, st, es) != 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
            return 0;
        }
        if (es && st->dispatched && !st->req_ended) { /* trailers end the request */
            st->req_ended = 1;
            h->cb->on_end(h->ud, st->data, st->id);
        }
        return 0;
    }
    case NGHTTP2_DATA: {
        if (f->hd.length == 0 && !es)
            glitch(h, "empty DATA frames");
        h2s_t *st = stream_of(h, f->hd.stream_id);
        if (es && st != NULL && st->dispatched && !st->req_ended) {
            st->req_ended = 1;
            h->cb->on_end(h->ud, st->data, st->id);
        }
        return 0;
    }
    case NGHTTP2_RST_STREAM:
        /* Called for closed streams too; only a reset of a stream still open counts. */
        if (nghttp2_session_find_stream(s, f->hd.stream_id) != NULL &&
            id_state(h, f->hd.stream_id) == ID_OPENED)
            set_id_state(h, f->hd.stream_id, ID_PEER_RESET);
        glitch(h, "stream resets (rapid reset)");
        return 0;
    case NGHTTP2_SETTINGS:
        /* The empty table goes out only when all else is ACKed (can_rest), so the last ACK
         * is its own. */
        if ((f->hd.flags & NGHTTP2_FLAG_ACK) && h->settings_acked < h->settings_sent &&
            ++h->settings_acked == h->settings_sent && h->table == TABLE_EMPTYING)
            h->table = TABLE_EMPTY;
        /* fall through */
    case NGHTTP2_PING:
        if (!(f->hd.flags & NGHTTP2_FLAG_ACK) &&
            bucket_take(&h->control, h->now_ms, CONTROL_BURST, CONTROL_PER_SEC) != 0)
            moat_h2_terminate(h, NGHTTP2_ENHANCE_YOUR_CALM, "SETTINGS/PING flood");
        return 0;
    case NGHTTP2_PRIORITY:
        /* Cheap to accept, but a stream of them costs CPU (CVE-2019-9513). */
        if (bucket_take(&h->control, h->now_ms, CONTROL_BURST, CONTROL_PER_SEC) != 0)
            moat_h2_terminate(h, NGHTTP2_ENHANCE_YOUR_CALM, "PRIORITY flood");
        return 0;
    default: return 0;
    }
}

/* nghttp2 drops a regular field with an invalid name (uppercase, say) and keeps the
 * request; RFC 9113 §8.2.1 calls the request malformed, and a proxy that forwards what the
 * client did not quite send invites smuggling: reset the stream. */
static int on_invalid_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                             size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                             void *ud)
{
    moat_h2_t *h = ud;
    (void)s, (void)name, (void)namelen, (void)value, (void)valuelen, (void)flags;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    h2s_t *st = stream_of(h, f->hd.stream_id);
    if (st != NULL && !st->malformed) {
        st->malformed = 1;
        moat_buf_free(&st->hb);
        glitch(h, "malformed header fields");
    }
    return 0;
}

static int on_invalid_frame_recv(nghttp2_session *s, const nghttp2_frame *f, int err, void *ud)
{
    moat_h2_t *h = ud;
    (void)s, (void)f, (void)err;
    if (!h->restoring)
        glitch(h, "invalid frames");
    return 0;
}

static int on_data_chunk_recv(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                              size_t len, void *ud)
{
    moat_h2_t *h = ud;
    (void)flags;
    /* The connection window is given back at once, so a stalled stream holds only its own
     * window; the stream window waits for moat_h2_consume. */
    nghttp2_session_consume_connection(s, len);
    h2s_t *st = stream_of(h, id);
    if (st == NULL || !st->dispatched) {
        nghttp2_session_consume_stream(s, id, len);
        return 0;
    }
    h->cb->on_data(h->ud, st->data, id, moat_slice(data, len));
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *ud)
{
    moat_h2_t *h = ud;
    h2s_t *st = stream_of(h, id);
    if (st == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(s, id, NULL);
    if (st->dispatched)
        h->cb->on_close(h->ud, st->data, id, code);
    stream_free(h, st);
    return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    moat_h2_t *h = ud;
    if ((f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA) ||
        !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    h2s_t *st = stream_of(h, f->hd.stream_id);
    /* The response is complete but the request body is not: tell the client to stop
     * sending it (RFC 9113 §8.1). Sent after the last response frame, never before. */
    if (st != NULL && !st->req_ended && !st->drain_body)
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
    return 0;
}

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    (void)s, (void)src;
    h2s_t *st = stream_of(ud, id);
    if (st == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    size_t n = MOAT_MIN(len, moat_buf_size(&st->out));
    if (n == 0 && !st->out_end) {
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    if (n)
        memcpy(buf, moat_buf_data(&st->out), n);
    moat_buf_consume(&st->out, n);
    if (moat_buf_size(&st->out) == 0) {
        /* An idle stream (an SSE stream between tokens) holds no buffer. */
        moat_buf_free(&st->out);
        if (st->out_end)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
    }
    return (ssize_t)n;
}

/* ---- public ---- */

/* The nghttp2 session, with moat's SETTINGS queued and the connection window opened. A woken
 * session (see "rest") expects no client preface. */
static int session_create(moat_h2_t *h, int woken)
{
    nghttp2_session_callbacks *cbs = NULL;
    nghttp2_option *opt = NULL;
    int r = MOAT_ENOMEM;
    if (nghttp2_session_callbacks_new(&cbs) != 0 || nghttp2_option_new(&opt) != 0)
        goto out;
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, on_invalid_frame_recv);
    nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, on_invalid_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_continuations(opt, MAX_CONTINUATIONS);
    nghttp2_option_set_max_settings(opt, 32);
    nghttp2_option_set_max_outbound_ack(opt, 1000);
    nghttp2_option_set_stream_reset_rate_limit(opt, 1000, 33);
    /* Closed streams are not kept for priority bookkeeping: memory per connection stays
     * bounded by the open streams. */
    nghttp2_option_set_no_closed_streams(opt, 1);
    nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
    if (woken)
        nghttp2_option_set_no_recv_client_magic(opt, 1);
    nghttp2_mem mem = {h, mem_malloc, mem_free, mem_calloc, mem_realloc};
    h->creating = 1;
    int created = nghttp2_session_server_new3(&h->s, cbs, h, opt, &mem) == 0;
    h->creating = 0;
    if (!created) {
        h->s = NULL;
        goto out;
    }
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, h->max_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, h->stream_window},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, h->max_header_list},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL, 1},
    };
    size_t niv = MOAT_ARRAY_LEN(iv) - (h->connect_protocol ? 0 : 1);
    if (nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, niv) != 0 ||
        nghttp2_session_set_local_window_size(h->s, NGHTTP2_FLAG_NONE, 0, MOAT_H2_CONN_WINDOW) !=
            0) {
        nghttp2_session_del(h->s);
        h->s = NULL;
        goto out;
    }
    if (!woken)
        h->settings_sent++;
    r = 0;
out:
    if (cbs)
        nghttp2_session_callbacks_del(cbs);
    if (opt)
        nghttp2_option_del(opt);
    return r;
}

moat_h2_t *moat_h2_new(const moat_h2_settings_t *set, const moat_h2_cb_t *cb, void *ud)
{
    moat_h2_t *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    h->cb = cb;
    h->ud = ud;
    h->max_header_list = set->max_header_list ? set->max_header_list : MOAT_H2_MAX_HEADER_LIST;
    h->max_streams =
        set->max_concurrent_streams ? set->max_concurrent_streams : MOAT_H2_MAX_STREAMS;
    h->stream_window = set->stream_window ? set->stream_window : MOAT_H2_STREAM_WINDOW;
    h->connect_protocol = set->enable_connect_protocol != 0;
    h->glitch.tokens = GLITCH_BURST;
    h->control.tokens = CONTROL_BURST;
    h->why = "";
    h->skip = NGHTTP2_CLIENT_MAGIC_LEN; /* nghttp2 checks the preface */
    h->max_id = -1;
    if (session_create(h, 0) != 0) {
        free(h);
        return NULL;
    }
    return h;
}

void moat_h2_free(moat_h2_t *h)
{
    if (h == NULL)
        return;
    if (h->s)
        nghttp2_session_del(h->s);
    while (h->streams)
        stream_free(h, h->streams);
    free(h);
}

/* ---- rest: an idle connection without its nghttp2 session ----
 *
 * An idle nghttp2 session keeps ~9 KiB (the session struct, two HPACK rings, the stream map:
 * PROFILE.md) that no option shrinks, and browsers hold HTTP/2 connections open for minutes
 * after their last request. So once the owner finds a connection quiet (moat_h2_rest) and
 * nothing is in flight, the session is freed and only what the next frame needs stays here:
 * the client's settings, the client's connection window for us, and the stream ids it used
 * (max_id and recent[], kept anyway). The next bytes from the client build a fresh session
 * that is brought to the same state by frames it cannot tell from real ones, and whose
 * answers are dropped (the client had the originals):
 *   - moat's SETTINGS, submitted and then "ACKed", so they are in force at once;
 *   - the client's SETTINGS replayed (nghttp2 wants a SETTINGS first anyway);
 *   - the connection windows: ours opened as at creation, the client's raised by a
 *     WINDOW_UPDATE;
 *   - a HEADERS frame with an empty block on the highest stream id the client used, which
 *     nghttp2 resets: lower ids are closed streams from then on, not idle ones.
 * HPACK's dynamic table of the client's encoder cannot be replayed (nghttp2 does not expose
 * its decoder's table). So before a connection that has sent header blocks rests,
 * SETTINGS_HEADER_TABLE_SIZE 0 goes out; once it is ACKed the client's table is empty and
 * stays empty (RFC 7541 §4.2), as a fresh decoder's is, and the woken session offers 4,096
 * bytes again. Moat's own encoder needs nothing: a fresh one refers only to entries it added
 * itself, which are the newest in the client's decoder too.
 * Conditions: no stream, nothing to send, no frame half-read, no header block open, every
 * SETTINGS ACKed, no GOAWAY either way, and the client's window for us at least the initial
 * 65,535 bytes (a WINDOW_UPDATE can raise a window, not lower it). tests/unit/h2_test.c
 * (test_rest_*) holds nghttp2 to each of these. */

static const int32_t remote_ids[NREMOTE] = {
    NGHTTP2_SETTINGS_HEADER_TABLE_SIZE,      NGHTTP2_SETTINGS_ENABLE_PUSH,
    NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
    NGHTTP2_SETTINGS_MAX_FRAME_SIZE,         NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
};

static int can_rest(moat_h2_t *h)
{
    return h->s != NULL && !h->goaway && !h->terminated && h->nstreams == 0 && h->skip == 0 &&
           h->nhd == 0 && !h->in_block && h->settings_acked == h->settings_sent &&
           nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s) &&
           nghttp2_session_get_remote_window_size(h->s) >= NGHTTP2_INITIAL_CONNECTION_WINDOW_SIZE;
}

static void rest_now(moat_h2_t *h)
{
    for (size_t i = 0; i < NREMOTE; i++)
        h->remote[i] = nghttp2_session_get_remote_settings(h->s, remote_ids[i]);
    h->remote_window = nghttp2_session_get_remote_window_size(h->s);
    nghttp2_session_del(h->s);
    h->s = NULL;
    h->rest_wanted = 0;
}

int moat_h2_rest(moat_h2_t *h)
{
    if (h->s == NULL)
        return 1;
    if (!can_rest(h))
        return 0;
    if (h->max_id < 0 || h->table == TABLE_EMPTY) {
        rest_now(h);
        return 1;
    }
    if (h->table == TABLE_IN_USE) {
        nghttp2_settings_entry e = {NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, 0};
        if (nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, &e, 1) != 0)
            return 0;
        h->settings_sent++;
        h->table = TABLE_EMPTYING;
    }
    h->rest_wanted = 1;
    return 0;
}

int moat_h2_at_rest(const moat_h2_t *h)
{
    return h->s == NULL;
}

static size_t put_frame_hd(uint8_t *p, size_t len, uint8_t type, uint8_t flags, int32_t id)
{
    p[0] = (uint8_t)(len >> 16), p[1] = (uint8_t)(len >> 8), p[2] = (uint8_t)len;
    p[3] = type, p[4] = flags;
    p[5] = (uint8_t)((uint32_t)id >> 24), p[6] = (uint8_t)(id >> 16), p[7] = (uint8_t)(id >> 8);
    p[8] = (uint8_t)id;
    return FRAME_HD;
}

static size_t put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return 4;
}

/* A fresh session for a rested connection (see "rest"). 0 or MOAT_ENOMEM. */
static int wake(moat_h2_t *h)
{
    if (session_create(h, 1) != 0)
        return MOAT_ENOMEM;
    uint8_t b[FRAME_HD + NREMOTE * 6 + FRAME_HD + FRAME_HD + 4 + FRAME_HD], *p = b;
    p += put_frame_hd(p, NREMOTE * 6, NGHTTP2_SETTINGS, NGHTTP2_FLAG_NONE, 0);
    for (size_t i = 0; i < NREMOTE; i++) {
        *p++ = 0;
        *p++ = (uint8_t)remote_ids[i];
        p += put_u32(p, h->remote[i]);
    }
    p += put_frame_hd(p, 0, NGHTTP2_SETTINGS, NGHTTP2_FLAG_ACK, 0); /* for moat's SETTINGS */
    if (h->remote_window > NGHTTP2_INITIAL_CONNECTION_WINDOW_SIZE) {
        p += put_frame_hd(p, 4, NGHTTP2_WINDOW_UPDATE, NGHTTP2_FLAG_NONE, 0);
        p += put_u32(p, (uint32_t)(h->remote_window - NGHTTP2_INITIAL_CONNECTION_WINDOW_SIZE));
    }
    if (h->max_id > 0)
        p += put_frame_hd(p, 0, NGHTTP2_HEADERS, NGHTTP2_FLAG_END_STREAM | NGHTTP2_FLAG_END_HEADERS,
                          h->max_id);
    h->restoring = 1;
    ssize_t r = nghttp2_session_mem_recv(h->s, b, (size_t)(p - b));
    const uint8_t *out;
    ssize_t n;
    int rounds = 0;
    while (r >= 0 && (n = nghttp2_session_mem_send(h->s, &out)) != 0 && rounds++ < 16)
        if (n < 0)
            r = n;
    h->restoring = 0;
    if (r < 0 || nghttp2_session_want_write(h->s)) {
        nghttp2_session_del(h->s);
        h->s = NULL;
        return MOAT_ENOMEM;
    }
    if (h->table == TABLE_EMPTY) {
        nghttp2_settings_entry e = {NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, 4096};
        if (nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, &e, 1) == 0) {
            h->settings_sent++;
            h->table = TABLE_IN_USE;
        }
    }
    return 0;
}

/* Hand bytes to nghttp2, which uses all of them or fails. */
static ssize_t feed(moat_h2_t *h, const uint8_t *p, size_t n)
{
    ssize_t r = nghttp2_session_mem_recv(h->s, p, n);
    return r < 0 ? r : 0;
}

static ssize_t recv_frames(moat_h2_t *h, const uint8_t *p, size_t len)
{
    const uint8_t *end = p + len;
    ssize_t r;
    /* nghttp2 gets the bytes one frame at a time, so that each frame header is judged (see
     * judge_frame) with every frame before it already processed. */
    while (p < end) {
        size_t left = (size_t)(end - p);
        if (h->skip > 0) {
            size_t n = MOAT_MIN(h->skip, left);
            if ((r = feed(h, p, n)) < 0)
                return r;
            h->skip -= n;
            p += n;
            continue;
        }
        int whole = h->nhd == 0 && left >= FRAME_HD; /* header entirely in this input */
        size_t n = MOAT_MIN((size_t)(FRAME_HD - h->nhd), left);
        memcpy(h->hd + h->nhd, p, n);
        h->nhd = (uint8_t)(h->nhd + n);
        p += n;
        if (h->nhd < FRAME_HD)
            break; /* kept until the rest arrives; nghttp2 has not seen it */
        h->nhd = 0;
        h->skip = (size_t)h->hd[0] << 16 | (size_t)h->hd[1] << 8 | h->hd[2];
        if (h->hd[3] == NGHTTP2_HEADERS || h->hd[3] == NGHTTP2_CONTINUATION)
            h->in_block = !(h->hd[4] & NGHTTP2_FLAG_END_HEADERS);
        int32_t id = (int32_t)(((uint32_t)h->hd[5] << 24 | (uint32_t)h->hd[6] << 16 |
                                (uint32_t)h->hd[7] << 8 | h->hd[8]) &
                               0x7fffffff);
        judge_frame(h, h->hd[3], id);
        if (whole) {
            /* Header and what is here of the payload in one call. */
            size_t m = MOAT_MIN(h->skip, (size_t)(end - p));
            if ((r = feed(h, p - FRAME_HD, FRAME_HD + m)) < 0)
                return r;
            h->skip -= m;
            p += m;
        } else if ((r = feed(h, h->hd, FRAME_HD)) < 0) {
            return r;
        }
    }
    return (ssize_t)len;
}

ssize_t moat_h2_recv(moat_h2_t *h, const void *data, size_t len, uint64_t now_ms)
{
    if (h->glitch.last_ms == 0)
        h->glitch.last_ms = h->control.last_ms = now_ms;
    h->now_ms = now_ms;
    if (h->s == NULL && wake(h) != 0) {
        h->why = "out of memory";
        return NGHTTP2_ERR_NOMEM;
    }
    ssize_t r = recv_frames(h, data, len);
    if (r >= 0 && h->rest_wanted && h->table == TABLE_EMPTY && can_rest(h))
        rest_now(h);
    if (r < 0) {
        if (h->why[0] == 0)
            h->why = r == NGHTTP2_ERR_FLOODED ? "flood of frames that need an answer"
                                              : nghttp2_strerror((int)r);
        h->flooded = r == NGHTTP2_ERR_FLOODED;
        if (!h->flooded && r != NGHTTP2_ERR_BAD_CLIENT_MAGIC)
            moat_h2_terminate(h, NGHTTP2_PROTOCOL_ERROR, h->why);
    }
    return r;
}

int moat_h2_send(moat_h2_t *h, moat_slice_t *out)
{
    if (h->s == NULL) {
        *out = moat_slice(NULL, 0);
        return 0;
    }
    const uint8_t *p = NULL;
    ssize_t n = nghttp2_session_mem_send(h->s, &p);
    if (n < 0) {
        *out = moat_slice(NULL, 0);
        return (int)n;
    }
    *out = moat_slice(p, (size_t)n);
    return 0;
}

int moat_h2_flooded(const moat_h2_t *h)
{
    return h->flooded;
}

int moat_h2_want_read(moat_h2_t *h)
{
    return h->s == NULL || nghttp2_session_want_read(h->s);
}

int moat_h2_want_write(moat_h2_t *h)
{
    return h->s != NULL && nghttp2_session_want_write(h->s);
}

size_t moat_h2_open_streams(const moat_h2_t *h)
{
    return h->nstreams;
}

const char *moat_h2_why(const moat_h2_t *h)
{
    return h->why;
}

/* Fields a response must not carry over HTTP/2 (RFC 9113 §8.2.2). */
static int forbidden(moat_slice_t n)
{
    /* By length first: this runs for every response field. */
    switch (n.len) {
    case 2: return moat_slice_ieq(n, "te");
    case 7: return moat_slice_ieq(n, "upgrade");
    case 10: return moat_slice_ieq(n, "connection") || moat_slice_ieq(n, "keep-alive");
    case 14: return moat_slice_ieq(n, "content-length");
    case 16: return moat_slice_ieq(n, "proxy-connection");
    case 17: return moat_slice_ieq(n, "transfer-encoding");
    default: return 0;
    }
}

int moat_h2_respond(moat_h2_t *h, int32_t id, int status, const moat_header_t *headers, size_t n,
                    int64_t content_length, int has_body)
{
    h2s_t *st = stream_of(h, id);
    if (st == NULL || st->responded)
        return MOAT_ECLOSED;
    char sbuf[4] = {(char)('0' + status / 100 % 10), (char)('0' + status / 10 % 10),
                    (char)('0' + status % 10), 0};
    char clbuf[24];
    /* Names lowercased into one buffer (nghttp2 requires lowercase): on the stack for
     * ordinary responses, from the heap only for unusually large ones. */
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += headers[i].name.len;
    char lower_stack[2048];
    nghttp2_nv nv_stack[48];
    char *lower = total <= sizeof lower_stack ? lower_stack : malloc(total);
    nghttp2_nv *nv = n + 2 <= MOAT_ARRAY_LEN(nv_stack) ? nv_stack : malloc((n + 2) * sizeof *nv);
    if ((total && lower == NULL) || nv == NULL) {
        if (lower != lower_stack)
            free(lower);
        if (nv != nv_stack)
            free(nv);
        return MOAT_ENOMEM;
    }
    size_t k = 0, off = 0;
    nv[k++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)sbuf, 7, 3, NGHTTP2_NV_FLAG_NONE};
    for (size_t i = 0; i < n; i++) {
        moat_slice_t nm = headers[i].name;
        if (nm.len == 0 || forbidden(nm))
            continue;
        for (size_t j = 0; j < nm.len; j++) {
            char c = nm.base[j];
            lower[off + j] = c >= 'A' && c <= 'Z' ? (char)(c + 32) : c;
        }
        nv[k++] = (nghttp2_nv){(uint8_t *)lower + off, (uint8_t *)headers[i].value.base, nm.len,
                               headers[i].value.len, NGHTTP2_NV_FLAG_NONE};
        off += nm.len;
    }
    if (content_length >= 0) {
        size_t l = sizeof clbuf;
        uint64_t v = (uint64_t)content_length;
        do {
            clbuf[--l] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        nv[k++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)clbuf + l, 14,
                               sizeof clbuf - l, NGHTTP2_NV_FLAG_NONE};
    }
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = read_body};
    /* nghttp2 copies the name/value pairs here, so nv and the lowercased names are free to
     * go once this returns. */
    int r = nghttp2_submit_response(h->s, id, nv, k, has_body ? &prd : NULL);
    if (lower != lower_stack)
        free(lower);
    if (nv != nv_stack)
        free(nv);
    if (r != 0)
        return MOAT_EINVAL;
    st->responded = 1;
    st->has_body = has_body != 0;
    if (!has_body)
        st->out_end = 1;
    return 0;
}

static void resume(moat_h2_t *h, h2s_t *st)
{
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(h->s, st->id);
    }
}

int moat_h2_send_data(moat_h2_t *h, int32_t id, moat_slice_t data)
{
    h2s_t *st = stream_of(h, id);
    if (st == NULL || !st->has_body || st->out_end)
        return MOAT_ECLOSED;
    if (data.len == 0)
        return 0;
    if (moat_buf_append(&st->out, data.base, data.len) != 0)
        return MOAT_ENOMEM;
    resume(h, st);
    return 0;
}

int moat_h2_send_end(moat_h2_t *h, int32_t id)
{
    h2s_t *st = stream_of(h, id);
    if (st == NULL)
        return MOAT_ECLOSED;
    if (st->out_end)
        return 0;
    st->out_end = 1;
    resume(h, st);
    return 0;
}

size_t moat_h2_stream_queued(moat_h2_t *h, int32_t id)
{
    h2s_t *st = stream_of(h, id);
    return st ? moat_buf_size(&st->out) : 0;
}

void moat_h2_consume(moat_h2_t *h, int32_t id, size_t n)
{
    if (n && h->s)
        nghttp2_session_consume_stream(h->s, id, n);
}

void moat_h2_drain_body(moat_h2_t *h, int32_t id)
{
    h2s_t *st = stream_of(h, id);
    if (st != NULL)
        st->drain_body = 1;
}

void moat_h2_reset(moat_h2_t *h, int32_t id, uint32_t error_code)
{
    if (h->s)
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, id, error_code);
}

void moat_h2_goaway(moat_h2_t *h)
{
    if (h->goaway || h->terminated || (h->s == NULL && wake(h) != 0))
        return;
    h->goaway = 1;
    nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h->s),
                          NGHTTP2_NO_ERROR, NULL, 0);
}
