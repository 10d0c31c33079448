/* Fuzz the HTTP/1.1 codec: request and response heads, head_end, and the chunked decoder fed
 * in one piece and in pseudo-random splits, which must agree. Every slice a result returns
 * must lie inside the input. */
#include "moat/http1.h"

#include <stdlib.h>

static moat_header_t hdrs[MOAT_HTTP1_MAX_HEADERS];

static void check_in(moat_slice_t s, const char *buf, size_t len)
{
    if (s.len > 0 && (s.base < buf || s.base + s.len > buf + len))
        abort();
}

static void check_msg(const moat_http1_msg_t *m, const char *buf, size_t len, int n)
{
    check_in(m->method, buf, (size_t)n);
    check_in(m->target, buf, (size_t)n);
    check_in(m->reason, buf, (size_t)n);
    check_in(m->host, buf, (size_t)n);
    for (size_t i = 0; i < m->nheaders; i++) {
        check_in(m->headers[i].name, buf, (size_t)n);
        check_in(m->headers[i].value, buf, (size_t)n);
        moat_http1_is_hop_by_hop(m, m->headers[i].name);
    }
    moat_http1_find_header(m, "content-length");
    /* The cheap end-of-head scan must agree with the parser, in one go and resumed. */
    size_t scan = 0;
    if (moat_http1_head_end(buf, len, &scan) != (size_t)n)
        abort();
    scan = 0;
    size_t end = 0;
    for (size_t i = 1; i <= len && end == 0; i += 1 + (i % 7))
        end = moat_http1_head_end(buf, i, &scan);
    if (end == 0)
        end = moat_http1_head_end(buf, len, &scan);
    if (end != (size_t)n)
        abort();
}

typedef struct {
    int rc;
    size_t used;
    size_t ndata;
    uint64_t hash;
} chunk_result_t;

static uint32_t rng_next(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static chunk_result_t chunked_run(const char *in, size_t len, uint32_t seed)
{
    chunk_result_t res = {0, 0, 0, 1469598103934665603ULL};
    moat_http1_chunked_t st;
    moat_http1_chunked_init(&st);
    size_t off = 0;
    while (off < len) {
        size_t piece = len - off;
        if (seed != 0) {
            size_t k = 1 + rng_next(&seed) % 16;
            if (k < piece)
                piece = k;
        }
        size_t p = 0;
        while (p < piece) {
            size_t c;
            moat_slice_t d;
            int r = moat_http1_chunked_decode(&st, in + off + p, piece - p, &c, &d);
            if (r < 0) {
                res.rc = r;
                res.used = off + p;
                return res;
            }
            if (c > piece - p)
                abort();
            check_in(d, in + off + p, piece - p);
            for (size_t i = 0; i < d.len; i++)
                res.hash = (res.hash ^ (unsigned char)d.base[i]) * 1099511628211ULL;
            res.ndata += d.len;
            p += c;
            if (r == 1) {
                res.rc = 1;
                res.used = off + p;
                return res;
            }
            if (c == 0)
                abort(); /* no progress with input left */
        }
        off += piece;
    }
    res.used = off;
    return res;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    int head = data[0] & 1;
    const char *buf = (const char *)data + 1;
    size_t len = size - 1;
    moat_http1_msg_t m;
    int status = 0;

    int n = moat_http1_parse_request(buf, len, &m, hdrs, MOAT_ARRAY_LEN(hdrs), &status);
    if (n > 0)
        check_msg(&m, buf, len, n);
    else if (n == MOAT_EPARSE && status != 400 && status != 414 && status != 431 && status != 501 &&
             status != 505)
        abort();
    else if (n != MOAT_EPARSE && n != MOAT_ENEED_MORE)
        abort();

    n = moat_http1_parse_response(buf, len, head, &m, hdrs, MOAT_ARRAY_LEN(hdrs));
    if (n > 0)
        check_msg(&m, buf, len, n);
    else if (n != MOAT_EPARSE && n != MOAT_ENEED_MORE)
        abort();

    chunk_result_t whole = chunked_run(buf, len, 0);
    chunk_result_t split = chunked_run(buf, len, 0x9e3779b9u ^ (uint32_t)data[0] ^ (uint32_t)len);
    if (whole.rc != split.rc || whole.ndata != split.ndata || whole.hash != split.hash)
        abort();
    if (whole.rc == 1 && whole.used != split.used)
        abort();
    return 0;
}
