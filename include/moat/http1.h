/* The HTTP/1.1 codec (RFC 9110/9112), sans-I/O: request and response head parsers and a
 * resumable chunked-body decoder. Nothing here allocates or copies: every slice a result
 * holds points into the caller's buffer, which must stay put while the result is used.
 *
 * Head parsing is stateless: call it again on the whole buffer when more bytes arrive. To
 * avoid re-parsing on every read, a caller may first wait for moat_http1_head_end() to find
 * the end of the head (resumable, so the whole scan is linear), then parse once.
 *
 * Line endings: requests must use CRLF; a bare LF or a bare CR is a 400 (a proxy that is more
 * lenient than the server behind it is a smuggling risk). Responses may end lines with a bare
 * LF (RFC 9112 §2.2 leniency for upstreams); a bare CR is still an error. */
#ifndef MOAT_HTTP1_H
#define MOAT_HTTP1_H

#include <stdint.h>

#include "moat/common.h"
#include "moat/http.h" /* moat_header_t */

#define MOAT_HTTP1_MAX_HEAD       (128 * 1024) /* head larger than this -> 431 */
#define MOAT_HTTP1_MAX_TARGET     (16 * 1024)  /* request line longer than this -> 414 */
#define MOAT_HTTP1_MAX_HEADERS    256          /* more header fields -> 431 */
#define MOAT_HTTP1_MAX_TRAILER    (16 * 1024)  /* chunked trailer section limit */
#define MOAT_HTTP1_MAX_CHUNK_LINE 4096         /* chunk-size line incl. extensions */

typedef enum {
    MOAT_BODY_NONE,       /* no body follows the head */
    MOAT_BODY_LENGTH,     /* content_length bytes follow (possibly 0) */
    MOAT_BODY_CHUNKED,    /* feed the bytes after the head to moat_http1_chunked_decode */
    MOAT_BODY_UNTIL_CLOSE /* responses only: the body ends when the upstream closes */
} moat_body_kind_t;

typedef struct {
    moat_slice_t method, target; /* request */
    int minor_version;           /* 0 or 1 */
    int status;                  /* response */
    moat_slice_t reason;         /* response; may be empty */
    moat_header_t *headers;      /* the caller's array, nheaders entries in wire order */
    size_t nheaders;
    moat_body_kind_t body;
    uint64_t content_length;       /* valid when body == MOAT_BODY_LENGTH */
    unsigned keep_alive : 1;       /* after this message the connection may be reused */
    unsigned expect_continue : 1;  /* request: HTTP/1.1 with Expect: 100-continue */
    unsigned upgrade : 1;          /* HTTP/1.1, Connection lists "upgrade" and Upgrade is present */
    unsigned connection_names : 1; /* Connection lists names beyond close/keep-alive/upgrade */
    moat_slice_t host;             /* request: the authority of an absolute-form target (RFC 9112
                                      §3.2.2: it overrides Host), else the single Host value; {NULL,0}
                                      for HTTP/1.0 without Host */
} moat_http1_msg_t;

/* Where the head in buf[0..len) ends: returns its length (through the empty line) or 0 when
 * it is not there yet. *scan_pos (start at 0) remembers how far the scan got, so calling it
 * again after each read costs only the new bytes. Finds "\n\r\n" and "\n\n": the parsers
 * then decide whether the line endings are acceptable. */
size_t moat_http1_head_end(const char *buf, size_t len, size_t *scan_pos);

/* Parse a request head from buf[0..len). Returns the head length (> 0, including any leading
 * empty lines skipped per RFC 9112 §2.2) when complete, MOAT_ENEED_MORE when more bytes are
 * needed, or MOAT_EPARSE with *status set to the status to answer before closing: 400, 414
 * (request line), 431 (head or header count), 501 (a single unknown transfer coding) or 505
 * (version). Errors in complete lines are reported before the head is complete.
 * headers[0..max_headers) is caller storage; more fields than that is a 431. */
int moat_http1_parse_request(const char *buf, size_t len, moat_http1_msg_t *msg,
                             moat_header_t *headers, size_t max_headers, int *status);

/* Parse a response head. req_method_head says the request was HEAD; together with the status
 * (1xx/204/304) it makes the body NONE. No Content-Length and no chunked means UNTIL_CLOSE
 * (and keep_alive 0). Returns the head length, MOAT_ENEED_MORE, or MOAT_EPARSE on anything
 * the proxy must not forward (bad framing, CL+TE, bad or repeated Content-Length, obs-fold,
 * control characters, too large); the proxy then answers 502. */
int moat_http1_parse_response(const char *buf, size_t len, int req_method_head,
                              moat_http1_msg_t *msg, moat_header_t *headers, size_t max_headers);

/* Resumable chunked-body decoder state. Zero it (or call moat_http1_chunked_init) before the
 * first byte of the body. */
typedef struct {
    int state;
    uint64_t remaining;   /* bytes left in the current chunk's data */
    size_t line_bytes;    /* bytes seen on the current chunk-size line */
    size_t trailer_bytes; /* bytes seen in the trailer section */
    int digits;           /* hex digits seen in the current chunk size */
} moat_http1_chunked_t;

static inline void moat_http1_chunked_init(moat_http1_chunked_t *st)
{
    memset(st, 0, sizeof(*st));
}

/* Decode from in[0..len). Consumes framing bytes and yields at most one slice of chunk data
 * pointing into `in` (no copy): returns 0 with *data set (possibly empty) and *consumed the
 * bytes used; call again with the rest. Returns 1 when the last chunk and the trailer section
 * are done (*consumed stops right after them: what follows is the next message), and
 * MOAT_EPARSE on bad framing (non-hex or overflowing size, missing CRLF, bare CR/LF, control
 * characters, a chunk line or trailer section over its limit). Chunk extensions and trailer
 * fields are validated and dropped. */
int moat_http1_chunked_decode(moat_http1_chunked_t *st, const char *in, size_t len,
                              size_t *consumed, moat_slice_t *data);

/* A message body read by its framing, the same way for a request body (the HTTP/1.1 front
 * end), a proxied response (server/proxy.c) and the control plane's client
 * (server/httpclient.c). */
typedef struct {
    moat_body_kind_t kind;
    uint64_t left; /* MOAT_BODY_LENGTH: bytes still to come */
    moat_http1_chunked_t chunked;
} moat_http1_body_t;

static inline void moat_http1_body_init(moat_http1_body_t *b, moat_body_kind_t kind,
                                        uint64_t content_length)
{
    memset(b, 0, sizeof *b);
    b->kind = kind;
    b->left = kind == MOAT_BODY_LENGTH ? content_length : 0;
}

/* Read from in[0..len): *data gets the body bytes found (pointing into `in`, possibly empty)
 * and *consumed the bytes used, framing included; call again with the rest. Returns 1 once
 * the body is complete (nothing after *consumed belongs to it; a NONE or zero-length body is
 * complete at once), 0 while more is to come (an UNTIL_CLOSE body ends only at EOF), or
 * MOAT_EPARSE on bad chunked framing. */
int moat_http1_body_read(moat_http1_body_t *b, const char *in, size_t len, size_t *consumed,
                         moat_slice_t *data);

/* Write the chunk header for n data bytes ("<hex>\r\n") into out; returns its length. The
 * data then needs "\r\n" after it; the body ends with "0\r\n\r\n". */
#define MOAT_HTTP1_CHUNK_PREFIX_MAX 20
size_t moat_http1_chunk_prefix(char out[MOAT_HTTP1_CHUNK_PREFIX_MAX], uint64_t n);

/* The origin-form part of a request target: an absolute-form "http://host/path?q" gives
 * "/path?q" ("/" when it has no path); any other target is returned unchanged. */
moat_slice_t moat_http1_origin_form(moat_slice_t target);

/* The value of the first header named `name` (case-insensitive), or {NULL, 0}. */
moat_slice_t moat_http1_find_header(const moat_http1_msg_t *m, const char *name);

/* Whether `name` is a hop-by-hop field that a proxy must not forward: Connection,
 * Keep-Alive, Proxy-Connection, TE, Transfer-Encoding, Trailer, Upgrade, HTTP2-Settings, or a
 * name listed in one of the message's Connection headers (m may be NULL: a message without
 * Connection headers, as from HTTP/2). The proxy adds its own framing and forwarding headers
 * after dropping these. */
int moat_http1_is_hop_by_hop(const moat_http1_msg_t *m, moat_slice_t name);

#endif
