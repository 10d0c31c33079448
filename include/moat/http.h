/* The HTTP model both protocols share (RFC 9110): a header field as two slices, status
 * reason phrases, and the pages moat answers with itself (errors, before or instead of a
 * proxied response). Nothing here knows HTTP/1.1 framing or HTTP/2 frames. */
#ifndef MOAT_HTTP_H
#define MOAT_HTTP_H

#include "moat/common.h"

typedef struct {
    moat_slice_t name, value; /* value has surrounding whitespace removed */
} moat_header_t;

/* The reason phrase of a status code ("Status" for one moat does not know). */
const char *moat_http_reason(int status);

/* The HTML page moat sends for an error status it answers itself; "" for a status that has
 * none. Static storage. */
const char *moat_http_error_page(int status);

/* A browser page load (GET, Accept: text/html) that waited upstream_wait for an app that
 * refuses connections: a 502 page that asks again by itself, with growing delays, and shows
 * the app's page (same URL) as soon as it answers. Static storage. */
const char *moat_http_retry_page(void);
/* 503: too many requests already wait for this site's app to come back. Static storage. */
const char *moat_http_busy_page(void);

/* The header fields every such page is sent with (HTML that must not be cached). */
#define MOAT_HTTP_PAGE_NHEADERS 2
extern const moat_header_t moat_http_page_headers[MOAT_HTTP_PAGE_NHEADERS];

#endif
