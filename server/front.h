/* The front-end core: what every request needs, written once for an HTTP/1.1 request and an
 * HTTP/2 stream alike. A front end parses a request in its own framing, describes it in a
 * moat_front_req_t and calls moat_front_start; the core finds the site, answers what moat
 * answers itself (every error status and page, max_body and Expect, ACME HTTP-01 and the
 * redirect to HTTPS, see redirect.c), works out the client's address behind
 * trusted_proxies, starts the proxy exchange and writes the access-log entry at the end.
 *
 * The front end keeps only what is truly its own: framing, flow control, connection state.
 * It implements moat_front_ops_t (proxy.h) for the response side; the proxy and the core
 * call those ops, never the front end's internals. */
#ifndef MOAT_FRONT_H
#define MOAT_FRONT_H

#include "moat/http.h"
#include "moat/http1.h"
#include "moat/proxy.h"
#include "moat/runtime.h"

#include <netinet/in.h>

typedef struct moat_worker moat_worker_t;

#define MOAT_REQUEST_ID_MAX 64

/* A request head as a front end parsed it. Slices need to live only during
 * moat_front_start. */
typedef struct {
    moat_slice_t method, target, authority;
    moat_slice_t protocol; /* HTTP/2 extended CONNECT's :protocol (RFC 8441), else empty */
    const moat_header_t *headers;
    size_t nheaders;
    const moat_http1_msg_t *h1; /* HTTP/1.1: for Connection-listed names; NULL from HTTP/2 */
    moat_req_body_t body;
    uint64_t content_length; /* when body is MOAT_REQ_BODY_LENGTH */
    int upgrade;             /* HTTP/1.1 Upgrade (websocket) asked for */
    int expect_continue;
    const char *proto; /* "HTTP/1.1", "HTTP/1.0", "HTTP/2": for the access log */
} moat_front_req_t;

typedef enum {
    MOAT_FRONT_ANSWERED, /* moat answered itself; the request is over (and logged) */
    MOAT_FRONT_PROXYING  /* an exchange runs: body through moat_front_body, end through done */
} moat_front_result_t;

/* One request's state in the core, embedded in the front end's connection (HTTP/1.1) or
 * stream (HTTP/2). */
typedef struct {
    moat_worker_t *w;
    const moat_front_ops_t *ops;
    void *stream; /* the front end's pointer, handed to ops */
    const struct sockaddr *peer;
    int port;
    moat_runtime_t *rt; /* held from start to finish */
    const moat_site_rt_t *site;
    moat_exchange_t *x; /* the running exchange, or NULL */
    uint64_t t_start, max_body, body_seen;
    int status;
    const char *proto;
    unsigned tls : 1;
    unsigned head_req : 1;
    unsigned responded : 1; /* a response head went out (the front end sets it) */
    /* The request body will not be read (an answer came first): HTTP/1.1 must end the
     * connection after the response, HTTP/2 drains and drops the stream's DATA. */
    unsigned body_unread : 1;
    unsigned logged : 1;
    char method[16];
    char host[256];
    char path[1024];
    char remote[INET6_ADDRSTRLEN + 1]; /* the client as a trusted proxy names it, or "" */
    /* The request's id: in the access log, sent upstream as X-Request-Id, and in the log lines
     * about the request. A trusted proxy's X-Request-Id is kept; else moat makes one. */
    char request_id[MOAT_REQUEST_ID_MAX + 1];
    uint32_t stream_id; /* HTTP/2: the stream (set by the front end after init), else 0 */
} moat_front_t;

/* Once per connection or stream. */
void moat_front_init(moat_front_t *f, moat_worker_t *w, const moat_front_ops_t *ops, void *stream,
                     const struct sockaddr *peer, int port, int tls);

/* Admit one request: answer it or start proxying it. */
moat_front_result_t moat_front_start(moat_front_t *f, const moat_front_req_t *req);

/* A request the front end could not parse: answer `status` (400, 414, 431, 501, 505) with its
 * page, log it, and mark the body unread. */
void moat_front_reject(moat_front_t *f, int status, const char *proto);

/* Answer with one of moat's own responses (headers end-to-end, body may be empty), log it
 * and end the request. For the core and redirect.c. */
void moat_front_answer(moat_front_t *f, int status, const moat_header_t *headers, size_t n,
                       moat_slice_t body);

/* Request body bytes for the running exchange, counted against max_body. Returns 0, or
 * MOAT_ETOO_LARGE when the body grew past max_body: the exchange was aborted and a 413 sent
 * if no response had begun (the front end then ends the request: close or reset), or another
 * negative code when the upstream cannot take the bytes. */
int moat_front_body(moat_front_t *f, moat_slice_t data);
int moat_front_body_end(moat_front_t *f);
/* The request body is refused (413 past max_body, 400 for bad chunked framing): the
 * upstream gets a cut request (it sees its connection end) and the client `status` when no
 * response had begun. The front end then ends the request (close or reset). */
void moat_front_refuse_body(moat_front_t *f, int status);

/* The front end's done() calls this first: the access-log entry, and the snapshot released.
 * bytes_in/bytes_out are what the request and response took on the wire. */
void moat_front_finish(moat_front_t *f, const moat_exchange_result_t *res);

/* The client went away or the connection is being torn down: abort any exchange, log the
 * request once (499 when nothing was answered), release the snapshot. */
void moat_front_abort(moat_front_t *f);

/* "site=NAME client=IP conn=IP:PORT [stream=N] request=ID" for the log lines about f's
 * request (warnings and errors; never on the request path otherwise). */
const char *moat_front_context(const moat_front_t *f, char *buf, size_t n);

/* Whether a request is between start and finish. */
static inline int moat_front_active(const moat_front_t *f)
{
    return f->rt != NULL;
}

#endif
