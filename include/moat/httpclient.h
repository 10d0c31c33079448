/* A small asynchronous HTTP/1.1 client for the control plane (ACME): one request per
 * connection over moat's socket layer and BoringSSL, the response head and body collected in
 * memory up to a bound. HTTPS is verified against the system trust store plus an optional
 * extra PEM trust anchor. Runs on one uv loop; not thread-safe. */
#ifndef MOAT_HTTPCLIENT_H
#define MOAT_HTTPCLIENT_H

#include "moat/common.h"
#include <stddef.h>
#include <stdint.h>
#include <strings.h>

#define MOAT_HTTPC_MAX_BODY    (1024 * 1024)
#define MOAT_HTTPC_MAX_HEADERS 64

/* A finished exchange. err is 0 when a complete response arrived (any status), else a
 * negative MOAT_E* code (status 0). Everything is owned by the client and valid only during
 * the callback; body is NUL-terminated. */
typedef struct {
    int err;
    int status;
    char *body;
    size_t body_len;
    char *names[MOAT_HTTPC_MAX_HEADERS], *values[MOAT_HTTPC_MAX_HEADERS];
    size_t nheaders;
} moat_httpc_response_t;

typedef void (*moat_httpc_cb)(void *data, const moat_httpc_response_t *resp);

/* The first header named `name` (case-insensitive), or NULL. Pass `from` = 0, or the index
 * after a previous match in *index to walk repeated headers; *index (may be NULL) gets the
 * match's index. A lookup in the response struct, not a call into the client: inline here so
 * that code handed a response (acme/, through moat_acme_io_t) needs nothing of server/. */
static inline const char *moat_httpc_header(const moat_httpc_response_t *r, const char *name,
                                            size_t from, size_t *index)
{
    for (size_t i = from; i < r->nheaders; i++) {
        if (strcasecmp(r->names[i], name) == 0) {
            if (index)
                *index = i;
            return r->values[i];
        }
    }
    return NULL;
}

typedef struct moat_httpc moat_httpc_t;
typedef struct uv_loop_s uv_loop_t;

/* extra_root_pem: path of a PEM file with extra trust anchors, or NULL. NULL with a sentence
 * in err when the trust store or the file cannot be loaded. */
moat_httpc_t *moat_httpc_new(uv_loop_t *loop, const char *extra_root_pem, uint64_t timeout_ms,
                             char *err, size_t errlen);
/* Start method url with an optional body (content_type NULL: none). The callback runs exactly
 * once, never from inside this call, unless it returns < 0 or the client is freed first. */
int moat_httpc_request(moat_httpc_t *h, const char *method, const char *url,
                       const char *content_type, const void *body, size_t len, moat_httpc_cb cb,
                       void *data);
/* The same with extra request header lines ("Name: value\r\n" each, or NULL), such as an
 * Authorization header; MOAT_EINVAL when they hold a bare CR or LF or do not end in CRLF. */
int moat_httpc_request_ex(moat_httpc_t *h, const char *method, const char *url,
                          const char *extra_headers, const char *content_type, const void *body,
                          size_t len, moat_httpc_cb cb, void *data);
/* Abort every request in flight (each callback runs now with err MOAT_ECLOSED) and free the
 * client once their handles have closed. */
void moat_httpc_free(moat_httpc_t *h);

#endif
