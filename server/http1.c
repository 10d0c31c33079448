/* HTTP/1.1 codec (include/moat/http1.h): head parsers and the chunked-body decoder.
 *
 * The parsers are deliberately stricter than RFC 9112 allows for requests. moat sits in front
 * of servers whose own parsers we do not control, so any message two parsers could frame
 * differently (CL+TE, duplicate Content-Length, obs-fold, bare CR/LF, odd transfer codings)
 * is refused with a 400 and the connection closed, instead of being "repaired" and forwarded.
 */
#include "moat/http1.h"

#include <string.h>

/* RFC 9110 §5.6.2 tchar: the characters of methods, header names and transfer codings. */
static const unsigned char tchar_table[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

static inline int is_tchar(unsigned char c)
{
    return tchar_table[c];
}

/* field-value characters (RFC 9110 §5.5): VCHAR, obs-text, SP and HT. CR, LF, NUL, DEL and
 * the other controls are what header injection and smuggling are made of. */
static inline int is_value_char(unsigned char c)
{
    return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static inline int is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* Characters of a URI host[:port] (reg-name, IP-literal, IPv4, port; RFC 3986). */
static int is_host_char(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("-._~!$&'()*+,;=:[]%", c) != NULL;
}

static int valid_authority(moat_slice_t a)
{
    if (a.len == 0)
        return 0;
    for (size_t i = 0; i < a.len; i++)
        if (!is_host_char((unsigned char)a.base[i]))
            return 0;
    return 1;
}

static moat_slice_t trim_ows(const char *p, size_t n)
{
    while (n > 0 && is_ows((unsigned char)p[0])) {
        p++;
        n--;
    }
    while (n > 0 && is_ows((unsigned char)p[n - 1]))
        n--;
    return moat_slice(p, n);
}

/* Calls fn for each non-empty element of a comma-separated list; stops when fn returns
 * non-zero and returns that value. */
static int list_each(moat_slice_t v, int (*fn)(moat_slice_t elem, void *arg), void *arg)
{
    size_t i = 0;
    while (i <= v.len) {
        size_t j = i;
        while (j < v.len && v.base[j] != ',')
            j++;
        moat_slice_t e = trim_ows(v.base + i, j - i);
        if (e.len > 0) {
            int r = fn(e, arg);
            if (r)
                return r;
        }
        i = j + 1;
    }
    return 0;
}

/* Content-Length = 1*DIGIT, one value. Capped at INT64_MAX so it fits off_t everywhere. */
static int parse_content_length(moat_slice_t v, uint64_t *out)
{
    if (v.len == 0)
        return -1;
    uint64_t n = 0;
    for (size_t i = 0; i < v.len; i++) {
        unsigned char c = (unsigned char)v.base[i];
        if (c < '0' || c > '9')
            return -1;
        if (n > (UINT64_C(0x7fffffffffffffff) - (c - '0')) / 10)
            return -1;
        n = n * 10 + (c - '0');
    }
    *out = n;
    return 0;
}

size_t moat_http1_head_end(const char *buf, size_t len, size_t *scan_pos)
{
    /* Empty lines before a request line (RFC 9112 §2.2) must not look like the end of a
     * head; the parser decides whether there were too many. */
    size_t i = 0;
    while (i < len && (buf[i] == '\r' || buf[i] == '\n'))
        i++;
    if (*scan_pos > i)
        i = *scan_pos;
    while (i < len) {
        const char *lf = memchr(buf + i, '\n', len - i);
        if (lf == NULL)
            break;
        size_t k = (size_t)(lf - buf) + 1;
        if (k < len && buf[k] == '\n')
            return k + 1;
        if (k + 1 < len && buf[k] == '\r' && buf[k + 1] == '\n')
            return k + 2;
        if (k == len || (k + 1 == len && buf[k] == '\r')) {
            /* Undecided until more bytes come: resume at this LF. */
            *scan_pos = (size_t)(lf - buf);
            return 0;
        }
        i = k;
    }
    *scan_pos = len;
    return 0;
}

/* What the header fields said, gathered while parsing and judged at the end of the head. */
typedef struct {
    int ncl, nte, nhost;
    moat_slice_t cl, te, host;
    unsigned conn_close : 1, conn_keep_alive : 1, conn_upgrade : 1, conn_other : 1;
    unsigned has_upgrade : 1, expect_continue : 1;
} fields_t;

static int connection_token(moat_slice_t e, void *arg)
{
    fields_t *f = arg;
    if (moat_slice_ieq(e, "close"))
        f->conn_close = 1;
    else if (moat_slice_ieq(e, "keep-alive"))
        f->conn_keep_alive = 1;
    else if (moat_slice_ieq(e, "upgrade"))
        f->conn_upgrade = 1;
    else if (e.len > 0)
        f->conn_other = 1;
    return 0;
}

/* Record one field with a meaning for framing or routing. Returns 0 or an HTTP status. */
static int note_field(fields_t *f, const moat_header_t *h, int is_request)
{
    moat_slice_t n = h->name;
    switch (n.len) {
    case 4:
        if (is_request && moat_slice_ieq(n, "host")) {
            if (++f->nhost > 1)
                return 400;
            /* An empty Host is allowed (RFC 9110 §7.2); a Host with '/', '@' or spaces is
             * an attempt to confuse routing. */
            if (h->value.len > 0 && !valid_authority(h->value))
                return 400;
            f->host = h->value;
        }
        break;
    case 6:
        if (is_request && moat_slice_ieq(n, "expect") && moat_slice_ieq(h->value, "100-continue"))
            f->expect_continue = 1;
        break;
    case 7:
        if (moat_slice_ieq(n, "upgrade") && h->value.len > 0)
            f->has_upgrade = 1;
        break;
    case 10:
        if (moat_slice_ieq(n, "connection"))
            list_each(h->value, connection_token, f);
        break;
    case 14:
        if (moat_slice_ieq(n, "content-length")) {
            /* Even identical repeats are refused: some servers take the first, some the
             * last, some the sum of a list, and that difference is request smuggling. */
            if (++f->ncl > 1)
                return 400;
            f->cl = h->value;
        }
        break;
    case 17:
        if (moat_slice_ieq(n, "transfer-encoding")) {
            if (++f->nte > 1)
                return 400;
            f->te = h->value;
        }
        break;
    }
    return 0;
}

/* Is the whole slice one token (a single transfer coding with no parameters)? */
static int is_token(moat_slice_t s)
{
    if (s.len == 0)
        return 0;
    for (size_t i = 0; i < s.len; i++)
        if (!is_tchar((unsigned char)s.base[i]))
            return 0;
    return 1;
}

/* Decide the framing from Content-Length / Transfer-Encoding. Returns 0 or an HTTP status. */
static int judge_framing(const fields_t *f, moat_http1_msg_t *msg, int is_request)
{
    if (f->nte > 0 && f->ncl > 0)
        return 400;
    if (f->nte > 0) {
        if (msg->minor_version == 0)
            return 400; /* RFC 9112 §6.1: HTTP/1.0 with Transfer-Encoding is faulty framing */
        if (!moat_slice_ieq(f->te, "chunked")) {
            /* A single coding we do not implement is a 501 (RFC 9112 §6.1); "identity",
             * lists and anything malformed are framing attacks and get a 400. */
            if (is_request && is_token(f->te) && !moat_slice_ieq(f->te, "identity"))
                return 501;
            return 400;
        }
        msg->body = MOAT_BODY_CHUNKED;
        return 0;
    }
    if (f->ncl > 0) {
        if (parse_content_length(f->cl, &msg->content_length) != 0)
            return 400;
        msg->body = MOAT_BODY_LENGTH;
        return 0;
    }
    msg->body = is_request ? MOAT_BODY_NONE : MOAT_BODY_UNTIL_CLOSE;
    return 0;
}

/* "HTTP/1.0" or "HTTP/1.1". Returns the minor version, -400 if it is not a version, or -505
 * for a well-formed version we do not speak. */
static int parse_version(const char *p, size_t n)
{
    if (n < 5 || memcmp(p, "HTTP/", 5) != 0)
        return -400;
    size_t i = 5, major_start = i;
    while (i < n && p[i] >= '0' && p[i] <= '9')
        i++;
    size_t major_len = i - major_start;
    if (major_len == 0 || i >= n || p[i] != '.')
        return -400;
    size_t minor_start = ++i;
    while (i < n && p[i] >= '0' && p[i] <= '9')
        i++;
    size_t minor_len = i - minor_start;
    if (minor_len == 0 || i != n)
        return -400;
    if (major_len == 1 && p[major_start] == '1' && minor_len == 1 &&
        (p[minor_start] == '0' || p[minor_start] == '1'))
        return p[minor_start] - '0';
    return -505;
}

/* Check the request-target against the method (RFC 9112 §3.2). Sets *authority for the
 * absolute form. Returns 0 or 400. */
static int check_target(moat_slice_t method, moat_slice_t t, moat_slice_t *authority)
{
    int is_connect = moat_slice_eq(method, "CONNECT");
    for (size_t i = 0; i < t.len; i++) {
        unsigned char c = (unsigned char)t.base[i];
        /* Visible ASCII only; a fragment is never part of a request-target. */
        if (c <= 0x20 || c >= 0x7f || c == '#')
            return 400;
    }
    if (is_connect) {
        /* authority-form: host ":" port, nothing else (RFC 9112 §3.2.3). */
        const char *colon = NULL;
        for (size_t i = 0; i < t.len; i++)
            if (t.base[i] == ':')
                colon = t.base + i;
        if (colon == NULL || colon == t.base || !valid_authority(t))
            return 400;
        size_t plen = t.len - (size_t)(colon + 1 - t.base);
        if (plen == 0 || plen > 5)
            return 400;
        for (size_t i = 0; i < plen; i++)
            if (colon[1 + i] < '0' || colon[1 + i] > '9')
                return 400;
        return 0;
    }
    if (t.len == 0)
        return 400;
    if (t.base[0] == '/')
        return 0;
    if (t.len == 1 && t.base[0] == '*')
        return moat_slice_eq(method, "OPTIONS") ? 0 : 400;
    size_t skip;
    if (t.len >= 7 && moat_slice_ieq(moat_slice(t.base, 7), "http://"))
        skip = 7;
    else if (t.len >= 8 && moat_slice_ieq(moat_slice(t.base, 8), "https://"))
        skip = 8;
    else
        return 400;
    size_t end = skip;
    while (end < t.len && t.base[end] != '/' && t.base[end] != '?')
        end++;
    moat_slice_t a = moat_slice(t.base + skip, end - skip);
    /* valid_authority also refuses userinfo ('@'), which RFC 9110 §4.2.4 says to treat as
     * an error: "http://trusted@evil/" is a phishing and routing trick. */
    if (!valid_authority(a))
        return 400;
    *authority = a;
    return 0;
}

/* The request line [p, p+n): method SP request-target SP HTTP-version. Returns 0 or a
 * status. */
static int parse_request_line(const char *p, size_t n, moat_http1_msg_t *msg)
{
    if (n > MOAT_HTTP1_MAX_TARGET)
        return 414;
    size_t i = 0;
    while (i < n && is_tchar((unsigned char)p[i]))
        i++;
    if (i == 0 || i >= n || p[i] != ' ')
        return 400;
    msg->method = moat_slice(p, i);
    size_t t0 = ++i;
    while (i < n && p[i] != ' ')
        i++;
    if (i >= n) /* HTTP/0.9 ("GET /") or a target with no version */
        return 400;
    msg->target = moat_slice(p + t0, i - t0);
    int v = parse_version(p + i + 1, n - i - 1);
    if (v < 0)
        return -v;
    msg->minor_version = v;
    return 0;
}

/* The status line: HTTP-version SP 3DIGIT [SP reason]. Upstreams that omit the reason and
 * its space are accepted. Returns 0 or -1. */
static int parse_status_line(const char *p, size_t n, moat_http1_msg_t *msg)
{
    if (n < 12 || p[8] != ' ')
        return -1;
    int v = parse_version(p, 8);
    if (v < 0)
        return -1;
    msg->minor_version = v;
    int st = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        st = st * 10 + (p[i] - '0');
    }
    if (st < 100)
        return -1;
    msg->status = st;
    if (n == 12) {
        msg->reason = moat_slice(p + 12, 0);
        return 0;
    }
    if (p[12] != ' ')
        return -1;
    for (size_t i = 13; i < n; i++)
        if (!is_value_char((unsigned char)p[i]))
            return -1;
    msg->reason = moat_slice(p + 13, n - 13);
    return 0;
}

/* Both head parsers. Returns the head length, MOAT_ENEED_MORE, or MOAT_EPARSE with *status
 * set. */
static int parse_head(const char *buf, size_t len, int is_request, int req_method_head,
                      moat_http1_msg_t *msg, moat_header_t *headers, size_t max_headers,
                      int *status)
{
    memset(msg, 0, sizeof(*msg));
    msg->headers = headers;
    if (max_headers > MOAT_HTTP1_MAX_HEADERS)
        max_headers = MOAT_HTTP1_MAX_HEADERS;
    fields_t f;
    memset(&f, 0, sizeof(f));
    moat_slice_t authority = {NULL, 0};

    /* Only the first MAX_HEAD bytes can hold a head we accept. */
    size_t lim = len < MOAT_HTTP1_MAX_HEAD ? len : MOAT_HTTP1_MAX_HEAD;
    size_t pos = 0;
    int have_start = 0, empty_lines = 0, st;

    for (;;) {
        const char *lf = memchr(buf + pos, '\n', lim - pos);
        if (lf == NULL) {
            /* Fail early on what can no longer become valid, so a slow or hostile client
             * cannot make us hold a buffer for nothing. */
            if (is_request && !have_start && lim - pos > MOAT_HTTP1_MAX_TARGET + 1) {
                st = 414;
                goto fail;
            }
            if (len >= MOAT_HTTP1_MAX_HEAD) {
                st = 431;
                goto fail;
            }
            for (size_t i = pos; i < lim; i++) {
                /* A bare CR or a NUL in the unfinished line is already an error. */
                if (buf[i] == '\0' || (buf[i] == '\r' && i + 1 < lim)) {
                    st = 400;
                    goto fail;
                }
            }
            return MOAT_ENEED_MORE;
        }
        size_t next = (size_t)(lf - buf) + 1, end = next - 1;
        if (end > pos && buf[end - 1] == '\r') {
            end--;
        } else if (is_request) {
            st = 400; /* bare LF */
            goto fail;
        }
        const char *p = buf + pos;
        size_t n = end - pos;

        if (!have_start) {
            if (n == 0 && is_request && ++empty_lines <= 4) {
                /* RFC 9112 §2.2: a few CRLFs left over after a previous body are ignored. */
                pos = next;
                continue;
            }
            if (is_request) {
                if ((st = parse_request_line(p, n, msg)) != 0)
                    goto fail;
                if ((st = check_target(msg->method, msg->target, &authority)) != 0)
                    goto fail;
            } else if (parse_status_line(p, n, msg) != 0) {
                st = 502;
                goto fail;
            }
            have_start = 1;
            pos = next;
            continue;
        }

        if (n == 0) { /* the empty line: end of head */
            pos = next;
            break;
        }
        if (is_ows((unsigned char)p[0])) {
            st = is_request ? 400 : 502; /* obs-fold (RFC 9112 §5.2) */
            goto fail;
        }
        size_t i = 0;
        while (i < n && is_tchar((unsigned char)p[i]))
            i++;
        if (i == 0 || i >= n || p[i] != ':') {
            /* Empty name, whitespace before the colon, a non-token byte or no colon. */
            st = is_request ? 400 : 502;
            goto fail;
        }
        for (size_t j = i + 1; j < n; j++) {
            if (!is_value_char((unsigned char)p[j])) {
                st = is_request ? 400 : 502;
                goto fail;
            }
        }
        if (msg->nheaders >= max_headers) {
            st = is_request ? 431 : 502;
            goto fail;
        }
        moat_header_t *h = &headers[msg->nheaders++];
        h->name = moat_slice(p, i);
        h->value = trim_ows(p + i + 1, n - i - 1);
        if ((st = note_field(&f, h, is_request)) != 0) {
            if (!is_request)
                st = 502;
            goto fail;
        }
        pos = next;
    }

    if ((st = judge_framing(&f, msg, is_request)) != 0) {
        if (!is_request)
            st = 502;
        goto fail;
    }
    int v11 = msg->minor_version == 1;
    if (is_request) {
        if (v11 && f.nhost == 0) {
            st = 400; /* RFC 9112 §3.2 */
            goto fail;
        }
        msg->host = authority.base != NULL ? authority : f.host;
        msg->expect_continue = v11 && f.expect_continue;
    } else {
        int s = msg->status;
        if (s < 200 || s == 204 || s == 304 || req_method_head)
            msg->body = MOAT_BODY_NONE;
    }
    msg->keep_alive = v11 ? !f.conn_close : (f.conn_keep_alive && !f.conn_close);
    if (msg->body == MOAT_BODY_UNTIL_CLOSE)
        msg->keep_alive = 0;
    /* RFC 9110 §7.8: Upgrade is ignored in HTTP/1.0. */
    msg->upgrade = v11 && f.conn_upgrade && f.has_upgrade;
    msg->connection_names = f.conn_other;
    return (int)pos;

fail:
    if (status != NULL)
        *status = st;
    return MOAT_EPARSE;
}

int moat_http1_parse_request(const char *buf, size_t len, moat_http1_msg_t *msg,
                             moat_header_t *headers, size_t max_headers, int *status)
{
    return parse_head(buf, len, 1, 0, msg, headers, max_headers, status);
}

int moat_http1_parse_response(const char *buf, size_t len, int req_method_head,
                              moat_http1_msg_t *msg, moat_header_t *headers, size_t max_headers)
{
    return parse_head(buf, len, 0, req_method_head, msg, headers, max_headers, NULL);
}

enum {
    CH_SIZE = 0, /* chunk-size hex digits */
    CH_SIZE_BWS, /* whitespace after the size, before ';' or CRLF */
    CH_EXT,      /* chunk extensions, skipped */
    CH_SIZE_LF,  /* LF after the chunk line's CR */
    CH_DATA,     /* remaining bytes of chunk data */
    CH_DATA_CR,  /* CRLF after chunk data */
    CH_DATA_LF,
    CH_TRAILER_START, /* start of a trailer line or of the final CRLF */
    CH_TRAILER_NAME,  /* trailer fields are checked, then dropped */
    CH_TRAILER_VALUE,
    CH_TRAILER_LF,
    CH_END_LF, /* LF of the final CRLF */
    CH_DONE,
    CH_ERROR,
};

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int moat_http1_chunked_decode(moat_http1_chunked_t *st, const char *in, size_t len,
                              size_t *consumed, moat_slice_t *data)
{
    size_t i = 0;
    *data = (moat_slice_t){NULL, 0};
    *consumed = 0;
    if (st->state == CH_DONE)
        return 1;
    if (st->state == CH_ERROR)
        return MOAT_EPARSE;

    while (i < len) {
        unsigned char c = (unsigned char)in[i];
        if (st->state == CH_DATA) {
            size_t n = len - i;
            if ((uint64_t)n > st->remaining)
                n = (size_t)st->remaining;
            *data = moat_slice(in + i, n);
            st->remaining -= n;
            if (st->remaining == 0)
                st->state = CH_DATA_CR;
            *consumed = i + n;
            return 0;
        }
        if (st->state <= CH_SIZE_LF && ++st->line_bytes > MOAT_HTTP1_MAX_CHUNK_LINE)
            goto fail;
        if (st->state >= CH_TRAILER_START && ++st->trailer_bytes > MOAT_HTTP1_MAX_TRAILER)
            goto fail;
        switch (st->state) {
        case CH_SIZE: {
            int h = hexval(c);
            if (h >= 0) {
                /* Refuse sizes past 2^60: no real chunk is that large, and it keeps the
                 * arithmetic far from wrapping. */
                if (st->remaining > (UINT64_C(1) << 56))
                    goto fail;
                st->remaining = (st->remaining << 4) | (uint64_t)h;
                st->digits++;
                break;
            }
            if (st->digits == 0)
                goto fail;
            if (c == '\r')
                st->state = CH_SIZE_LF;
            else if (c == ';')
                st->state = CH_EXT;
            else if (is_ows(c))
                st->state = CH_SIZE_BWS;
            else
                goto fail;
            break;
        }
        case CH_SIZE_BWS:
            if (c == '\r')
                st->state = CH_SIZE_LF;
            else if (c == ';')
                st->state = CH_EXT;
            else if (!is_ows(c))
                goto fail;
            break;
        case CH_EXT:
            if (c == '\r')
                st->state = CH_SIZE_LF;
            else if (!is_value_char(c))
                goto fail;
            break;
        case CH_SIZE_LF:
            if (c != '\n')
                goto fail;
            st->line_bytes = 0;
            st->digits = 0;
            st->state = st->remaining == 0 ? CH_TRAILER_START : CH_DATA;
            break;
        case CH_DATA_CR:
            if (c != '\r')
                goto fail;
            st->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (c != '\n')
                goto fail;
            st->state = CH_SIZE;
            break;
        case CH_TRAILER_START:
            if (c == '\r')
                st->state = CH_END_LF;
            else if (is_tchar(c))
                st->state = CH_TRAILER_NAME;
            else
                goto fail;
            break;
        case CH_TRAILER_NAME:
            if (c == ':')
                st->state = CH_TRAILER_VALUE;
            else if (!is_tchar(c))
                goto fail;
            break;
        case CH_TRAILER_VALUE:
            if (c == '\r')
                st->state = CH_TRAILER_LF;
            else if (!is_value_char(c))
                goto fail;
            break;
        case CH_TRAILER_LF:
            if (c != '\n')
                goto fail;
            st->state = CH_TRAILER_START;
            break;
        case CH_END_LF:
            if (c != '\n')
                goto fail;
            st->state = CH_DONE;
            *consumed = i + 1;
            return 1;
        default: goto fail;
        }
        i++;
    }
    *consumed = len;
    return 0;

fail:
    st->state = CH_ERROR;
    return MOAT_EPARSE;
}

size_t moat_http1_chunk_prefix(char out[MOAT_HTTP1_CHUNK_PREFIX_MAX], uint64_t n)
{
    static const char hex[] = "0123456789abcdef";
    char tmp[16];
    size_t k = 0;
    do {
        tmp[k++] = hex[n & 15];
        n >>= 4;
    } while (n != 0);
    size_t len = 0;
    while (k > 0)
        out[len++] = tmp[--k];
    out[len++] = '\r';
    out[len++] = '\n';
    return len;
}

moat_slice_t moat_http1_find_header(const moat_http1_msg_t *m, const char *name)
{
    for (size_t i = 0; i < m->nheaders; i++)
        if (moat_slice_ieq(m->headers[i].name, name))
            return m->headers[i].value;
    return (moat_slice_t){NULL, 0};
}

static int token_matches(moat_slice_t e, void *arg)
{
    return moat_slices_ieq(e, *(moat_slice_t *)arg);
}

int moat_http1_is_hop_by_hop(const moat_http1_msg_t *m, moat_slice_t name)
{
    /* Called for every field a proxy forwards: reject by length before comparing names, and
     * rescan the Connection fields only when they named something beyond the usual three. */
    switch (name.len) {
    case 2:
        if (moat_slice_ieq(name, "te"))
            return 1;
        break;
    case 7:
        if (moat_slice_ieq(name, "trailer") || moat_slice_ieq(name, "upgrade"))
            return 1;
        break;
    case 10:
        if (moat_slice_ieq(name, "connection") || moat_slice_ieq(name, "keep-alive"))
            return 1;
        break;
    case 16:
        if (moat_slice_ieq(name, "proxy-connection"))
            return 1;
        break;
    case 14:
        if (moat_slice_ieq(name, "http2-settings")) /* only meaningful to an h2c upgrade */
            return 1;
        break;
    case 17:
        if (moat_slice_ieq(name, "transfer-encoding"))
            return 1;
        break;
    }
    if (m == NULL || !m->connection_names)
        return 0;
    for (size_t i = 0; i < m->nheaders; i++)
        if (moat_slice_ieq(m->headers[i].name, "connection") &&
            list_each(m->headers[i].value, token_matches, &name))
            return 1;
    return 0;
}

moat_slice_t moat_http1_origin_form(moat_slice_t t)
{
    const char *end = t.base + t.len;
    if (t.len == 0 || t.base[0] == '/' || t.base[0] == '*')
        return t;
    const char *p = memchr(t.base, '/', t.len);
    if (p == NULL || p + 1 >= end || p[1] != '/')
        return t; /* authority-form (CONNECT): nothing to strip */
    const char *q = memchr(p + 2, '/', (size_t)(end - (p + 2)));
    return q ? moat_slice(q, (size_t)(end - q)) : MOAT_SLICE_LIT("/");
}

int moat_http1_body_read(moat_http1_body_t *b, const char *in, size_t len, size_t *consumed,
                         moat_slice_t *data)
{
    *consumed = 0;
    *data = (moat_slice_t){NULL, 0};
    switch (b->kind) {
    case MOAT_BODY_NONE: return 1;
    case MOAT_BODY_LENGTH: {
        size_t take = (size_t)MOAT_MIN((uint64_t)len, b->left);
        *data = moat_slice(in, take);
        *consumed = take;
        b->left -= take;
        return b->left == 0;
    }
    case MOAT_BODY_UNTIL_CLOSE:
        *data = moat_slice(in, len);
        *consumed = len;
        return 0;
    case MOAT_BODY_CHUNKED: return moat_http1_chunked_decode(&b->chunked, in, len, consumed, data);
    }
    return MOAT_EPARSE;
}
