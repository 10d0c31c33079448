/* A sans-I/O HTTP/2 server session on nghttp2 (http2/session.c). Bytes from the client go in
 * with moat_h2_recv, bytes for the client come out of moat_h2_send; nothing here touches a
 * socket or calls into server/. Each request stream is handed to the owner through the
 * callbacks below, with its head already validated by nghttp2 (pseudo-headers, lowercase
 * names, no connection-specific fields, TE only "trailers", content-length vs DATA) and its
 * split cookie fields joined with "; " (RFC 9113 §8.2.3). Frames for streams already closed
 * follow RFC 9113 §5.1 even after nghttp2 has forgotten the stream: after the client's
 * END_STREAM a connection error STREAM_CLOSED, after its RST_STREAM a stream error, a lower
 * stream id than one in use PROTOCOL_ERROR; frames on streams moat closed first are ignored.
 *
 * Flow control is the owner's: request DATA is counted against the connection window at
 * once (one stalled stream never blocks the others) but against its stream's window only
 * when the owner calls moat_h2_consume, i.e. when the upstream has taken the bytes.
 * Response bodies are queued per stream (moat_h2_send_data) and leave as DATA frames as the
 * client's windows allow; moat_h2_stream_queued says how much waits, for backpressure.
 *
 * Abuse limits: nghttp2's own (CONTINUATION count, SETTINGS entries, queued outbound ACKs,
 * stream reset rate) plus moat's: a header list size cap and a "glitch" budget (client
 * resets, invalid frames, oversized header lists, empty DATA frames, SETTINGS/PING beyond a
 * rate) whose exhaustion ends the connection with GOAWAY ENHANCE_YOUR_CALM. */
#ifndef MOAT_H2_H
#define MOAT_H2_H

#include "moat/common.h"
#include "moat/http.h" /* moat_header_t */

#include <stdint.h>
#include <sys/types.h>

#define MOAT_H2_MAX_STREAMS     128
#define MOAT_H2_MAX_HEADER_LIST (64 * 1024)
#define MOAT_H2_STREAM_WINDOW   (256 * 1024)
#define MOAT_H2_CONN_WINDOW     (1024 * 1024)

/* HTTP/2 error codes moat uses (RFC 9113 §7). */
#define MOAT_H2_NO_ERROR          0x0
#define MOAT_H2_PROTOCOL_ERROR    0x1
#define MOAT_H2_INTERNAL_ERROR    0x2
#define MOAT_H2_REFUSED_STREAM    0x7
#define MOAT_H2_CANCEL            0x8
#define MOAT_H2_ENHANCE_YOUR_CALM 0xb

typedef struct moat_h2 moat_h2_t;

/* A request head. Slices are valid during on_request only. */
typedef struct {
    moat_slice_t method, scheme, authority, path;
    moat_slice_t protocol;        /* :protocol of an extended CONNECT (RFC 8441), else empty */
    const moat_header_t *headers; /* regular fields in arrival order, names lowercase */
    size_t nheaders;
    int64_t content_length; /* -1 when absent */
    int end_stream;         /* no DATA follows */
    size_t head_bytes;      /* decoded size of the header list, for the access log */
} moat_h2_request_t;

typedef struct {
    /* A complete request head on stream id. Return the owner's pointer for this stream (the
     * other callbacks get it back) or NULL; the owner answers or resets the stream itself. */
    void *(*on_request)(void *ud, int32_t id, const moat_h2_request_t *req);
    /* Request body bytes (valid during the call). The owner calls moat_h2_consume for them
     * once they are taken; until then they hold the stream's flow-control window. */
    void (*on_data)(void *ud, void *stream, int32_t id, moat_slice_t data);
    /* The client ended its side of the stream. */
    void (*on_end)(void *ud, void *stream, int32_t id);
    /* The stream is gone (reset by either side, or both sides ended). Called once for each
     * stream on_request saw; `stream` is never passed again. */
    void (*on_close)(void *ud, void *stream, int32_t id, uint32_t error_code);
} moat_h2_cb_t;

typedef struct {
    uint32_t max_concurrent_streams; /* 0: MOAT_H2_MAX_STREAMS */
    uint32_t max_header_list;        /* 0: MOAT_H2_MAX_HEADER_LIST */
    uint32_t stream_window;          /* 0: MOAT_H2_STREAM_WINDOW */
    int enable_connect_protocol;     /* advertise RFC 8441 extended CONNECT */
} moat_h2_settings_t;

/* A server session; the SETTINGS frame is queued at once. NULL when out of memory. */
moat_h2_t *moat_h2_new(const moat_h2_settings_t *s, const moat_h2_cb_t *cb, void *ud);
/* Free the session; on_close is not called for streams still open. */
void moat_h2_free(moat_h2_t *h);

/* Feed client bytes; now_ms paces the abuse budgets. Returns the bytes used (all of them, or
 * fewer only after an error) or a negative nghttp2 error code when the connection must end
 * (moat_h2_send may still have a GOAWAY to flush). */
ssize_t moat_h2_recv(moat_h2_t *h, const void *data, size_t len, uint64_t now_ms);
/* The next bytes for the client, valid until the next call into any session of this thread
 * (the sessions of a thread share one frame buffer: copy or write them before anything else
 * runs); out->len 0 when nothing is pending. Returns 0 or a negative nghttp2 error code. */
int moat_h2_send(moat_h2_t *h, moat_slice_t *out);
/* Whether the session still wants to read or write; both 0 means the connection is over. */
int moat_h2_want_read(moat_h2_t *h);
int moat_h2_want_write(moat_h2_t *h);
/* Open streams (those on_request saw and on_close did not yet). */
size_t moat_h2_open_streams(const moat_h2_t *h);
/* The last moat_h2_recv error was a flood of frames needing an answer: close without
 * flushing. */
int moat_h2_flooded(const moat_h2_t *h);
/* Why the session ended itself, for logs: "" while fine. */
const char *moat_h2_why(const moat_h2_t *h);

/* The owner found the connection quiet (no stream for a while): free the nghttp2 session
 * and keep only what the next frame needs (~9 KiB less; the next moat_h2_recv builds a
 * fresh one). 1 when at rest; 0 when not possible now, or when the client must first ACK an
 * empty HPACK table, after which the session rests by itself if still quiet. See "rest" in
 * http2/session.c. */
int moat_h2_rest(moat_h2_t *h);
int moat_h2_at_rest(const moat_h2_t *h);

/* Answer stream id: status plus end-to-end fields (names are lowercased here; fields HTTP/2
 * forbids are dropped). content_length >= 0 adds content-length. With has_body the body
 * follows through moat_h2_send_data and moat_h2_send_end. 0 or a negative code. */
int moat_h2_respond(moat_h2_t *h, int32_t id, int status, const moat_header_t *headers, size_t n,
                    int64_t content_length, int has_body);
/* Queue response body bytes (copied) / end the body. 0 or a negative code (MOAT_ENOMEM fails
 * only this connection's caller, MOAT_ECLOSED when the stream is gone). */
int moat_h2_send_data(moat_h2_t *h, int32_t id, moat_slice_t data);
int moat_h2_send_end(moat_h2_t *h, int32_t id);
/* Response bytes queued on this stream and not yet handed to moat_h2_send. */
size_t moat_h2_stream_queued(moat_h2_t *h, int32_t id);
/* Give stream-level window back for n request body bytes the owner has taken. */
void moat_h2_consume(moat_h2_t *h, int32_t id, size_t n);
/* Once the response has ended, a stream whose request body is still arriving is reset with
 * NO_ERROR (RFC 9113 §8.1). Call this to keep reading (and dropping) the body instead: some
 * clients (curl 7.88) report that reset as an error and never show the response. */
void moat_h2_drain_body(moat_h2_t *h, int32_t id);
/* Reset a stream (RST_STREAM with this error code). */
void moat_h2_reset(moat_h2_t *h, int32_t id, uint32_t error_code);
/* Graceful: GOAWAY NO_ERROR naming the last stream taken; open streams finish. Idempotent. */
void moat_h2_goaway(moat_h2_t *h);
/* End the connection with GOAWAY and this error code; no more frames are processed. */
void moat_h2_terminate(moat_h2_t *h, uint32_t error_code, const char *why);

#endif
