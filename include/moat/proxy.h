/* The reverse proxy, written once for every front end. A front end (an HTTP/1.1 connection or
 * an HTTP/2 stream, through the core in server/front.c) hands the proxy a request head and
 * then its body bit by bit; the proxy talks HTTP/1.1 to an upstream from the worker's pool
 * and hands the response back through the front end's ops. Neither side buffers a whole
 * body: each pauses the other when its output queue passes MOAT_PROXY_HIGH_WATER. A
 * websocket (HTTP/1.1 Upgrade or RFC 8441 CONNECT) is the same exchange after the switch. */
#ifndef MOAT_PROXY_H
#define MOAT_PROXY_H

#include "moat/common.h"
#include "moat/http.h"
#include "moat/http1.h"
#include "moat/runtime.h"
#include <sys/socket.h>

#define MOAT_PROXY_HIGH_WATER (256 * 1024)

typedef struct moat_worker moat_worker_t;
typedef struct moat_exchange moat_exchange_t;

typedef enum {
    MOAT_REQ_BODY_NONE,
    MOAT_REQ_BODY_LENGTH,
    MOAT_REQ_BODY_STREAM /* length unknown: sent upstream chunked */
} moat_req_body_t;

/* A request as the front end parsed it. Slices need to live only during moat_proxy_start:
 * the proxy serializes the upstream head at once. */
typedef struct {
    moat_slice_t method, target, authority;
    const moat_header_t *headers; /* end-to-end fields; the proxy drops hop-by-hop ones */
    size_t nheaders;
    const moat_http1_msg_t *h1; /* for Connection-listed names; NULL from HTTP/2 */
    moat_req_body_t body;
    uint64_t content_length;
    /* The client asks for a protocol switch: upgrade_proto names it (HTTP/1.1 Upgrade, or the
     * :protocol of an RFC 8441 CONNECT). extended_connect: the client speaks HTTP/2 and sent
     * no Sec-WebSocket-Key, so the proxy asks the upstream for an HTTP/1.1 Upgrade of its
     * own (RFC 8441 §5). */
    int upgrade;
    int extended_connect;
    moat_slice_t upgrade_proto;
    int tls; /* arrived over TLS: X-Forwarded-Proto https */
    const struct sockaddr *peer;
    /* Sent upstream as X-Request-Id (any X-Request-Id among headers is dropped); empty: none. */
    moat_slice_t request_id;
    /* Names the request in the proxy's log lines ("site=... client=... request=..."); must
     * live as long as the exchange (the front end's state does). May be NULL. */
    const char *(*context)(const void *ctx, char *buf, size_t n);
    const void *ctx;
} moat_request_t;

typedef struct {
    int status;
    const char *upstream; /* label, or "" when none was reached */
    uint64_t upstream_ms;
} moat_exchange_result_t;

/* What the proxy (and the front-end core) need from a front end. `front` is the front end's
 * own pointer. The ops may be called from any upstream event; a front end that gathers
 * output sends it in flush, which the proxy calls at the end of every upstream event that
 * produced some (done implies it). */
typedef struct {
    /* The response head. headers are end-to-end fields only (slices valid during the call);
     * content_length is -1 when unknown or when none must be sent (204, 304, 101), and for a
     * HEAD response the length a GET would have; has_body 0 for HEAD/204/304 and 101. */
    int (*send_head)(void *front, int status, const moat_header_t *headers, size_t n,
                     int64_t content_length, int has_body);
    int (*send_data)(void *front, moat_slice_t data);
    int (*send_end)(void *front);
    /* Optional: an interim 100 (Continue) before the request body is read. */
    void (*send_continue)(void *front);
    /* Bytes the front end still has to deliver to the client. */
    size_t (*queued)(void *front);
    /* Stop (1) or resume (0) reading the request body: the upstream is not taking it. */
    void (*pause_body)(void *front, int pause);
    /* After a 101: the exchange is now a byte tunnel; the front end relays raw bytes with
     * moat_proxy_tunnel_write and gets them through send_data. */
    void (*upgraded)(void *front);
    /* What was given so far must go out now. */
    void (*flush)(void *front);
    /* Bytes this request and its response took on the wire so far (access log). */
    void (*counts)(void *front, uint64_t *bytes_in, uint64_t *bytes_out);
    /* The exchange is over: err 0 when the response was delivered whole, negative when it
     * was cut (the front end must end the connection or stream abruptly). Never called from
     * inside moat_proxy_start. The front end must drop its exchange pointer. */
    void (*done)(void *front, int err, const moat_exchange_result_t *res);
} moat_front_ops_t;

/* Begin proxying req for site. Returns 0 with *out set: the exchange runs and its end comes
 * through ops->done, never from inside this call. Or a negative code when nothing was started
 * (out of memory: no callback follows; nothing reached the app, so the caller answers 502).
 * An app that refuses connections does not fail the start: the request waits for it (the
 * site's upstream_wait=, its body paused through ops->pause_body) and its answer, the app's
 * or moat's 502/503, comes through done. rt must stay held by the front end until done. */
int moat_proxy_start(moat_worker_t *w, const moat_runtime_t *rt, const moat_site_rt_t *site,
                     const moat_request_t *req, const moat_front_ops_t *ops, void *front,
                     moat_exchange_t **out);
/* Request body bytes, and its end. Return 0 or a negative code. */
int moat_proxy_body(moat_exchange_t *x, moat_slice_t data);
int moat_proxy_body_end(moat_exchange_t *x);
/* The front end's queue fell below the high-water mark: read the upstream again. */
void moat_proxy_front_drained(moat_exchange_t *x);
/* The client went away: drop the upstream connection; no callback follows. */
void moat_proxy_abort(moat_exchange_t *x);
/* Tunnel mode: client bytes to the upstream, and the client's end of stream. */
int moat_proxy_tunnel_write(moat_exchange_t *x, moat_slice_t data);
void moat_proxy_tunnel_client_eof(moat_exchange_t *x);

#endif
