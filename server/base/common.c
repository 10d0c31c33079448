/* Slices, buffers, error strings and allocation wrappers (include/moat/common.h). */
#include "moat/common.h"
#include "moat/mem.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int moat_slices_ieq(moat_slice_t a, moat_slice_t b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++) {
        unsigned char x = (unsigned char)a.base[i], y = (unsigned char)b.base[i];
        if (x >= 'A' && x <= 'Z')
            x += 32;
        if (y >= 'A' && y <= 'Z')
            y += 32;
        if (x != y)
            return 0;
    }
    return 1;
}

char *moat_buf_reserve(moat_buf_t *b, size_t n)
{
    /* An empty buffer has no memory yet: base + len would be NULL, which means failure. */
    if (b->base != NULL && b->cap - b->len >= n)
        return b->base + b->len;
    /* Slide live bytes to the front before growing: a consumed prefix is free space. */
    if (b->off > 0) {
        memmove(b->base, b->base + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n)
            return b->base + b->len;
    }
    size_t cap = b->cap ? b->cap : 1024;
    while (cap - b->len < n) {
        if (cap > SIZE_MAX / 2)
            return NULL;
        cap *= 2;
    }
    char *p = moat_mem_realloc(b->base, cap);
    if (p == NULL)
        return NULL;
    b->base = p;
    b->cap = cap;
    return b->base + b->len;
}

int moat__buf_append_slow(moat_buf_t *b, const void *p, size_t n)
{
    /* Nothing to add is not a reason to allocate: an idle connection holds no buffer. */
    if (n == 0)
        return 0;
    char *dst = moat_buf_reserve(b, n);
    if (dst == NULL)
        return MOAT_ENOMEM;
    memcpy(dst, p, n);
    b->len += n;
    return 0;
}

int moat_buf_appendf(moat_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[512];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return MOAT_EINVAL;
    if ((size_t)n < sizeof tmp)
        return moat_buf_append(b, tmp, (size_t)n);
    char *dst = moat_buf_reserve(b, (size_t)n + 1);
    if (dst == NULL)
        return MOAT_ENOMEM;
    va_start(ap, fmt);
    vsnprintf(dst, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int moat_buf_put_u64(moat_buf_t *b, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return moat_buf_append(b, tmp + i, sizeof tmp - i);
}

void moat_buf_consume(moat_buf_t *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len)
        b->off = b->len = 0;
}

void moat_buf_reset(moat_buf_t *b)
{
    b->off = b->len = 0;
}

void moat_buf_free(moat_buf_t *b)
{
    moat_mem_free(b->base);
    b->base = NULL;
    b->off = b->len = b->cap = 0;
}

const char *moat_strerror(int err)
{
    switch (err) {
    case 0: return "success";
#define MOAT_ERR_CASE(name, msg)                                                                   \
    case MOAT_E##name: return msg;
        MOAT_ERRNO_MAP(MOAT_ERR_CASE)
#undef MOAT_ERR_CASE
    default: return "unknown error";
    }
}

static void *check(void *p)
{
    if (p == NULL) {
        fputs("moat: out of memory\n", stderr);
        abort();
    }
    return p;
}

void *moat_xmalloc(size_t n)
{
    return check(malloc(n ? n : 1));
}

void *moat_xcalloc(size_t n, size_t m)
{
    return check(calloc(n ? n : 1, m ? m : 1));
}

void *moat_xrealloc(void *p, size_t n)
{
    return check(realloc(p, n ? n : 1));
}

char *moat_xstrdup(const char *s)
{
    return check(strdup(s));
}

char *moat_xstrndup(const char *s, size_t n)
{
    return check(strndup(s, n));
}

void moat_secret_wipe(void *p, size_t n)
{
    if (p != NULL && n > 0)
        explicit_bzero(p, n);
}

void moat_secret_free(char *s)
{
    if (s == NULL)
        return;
    moat_secret_wipe(s, strlen(s));
    free(s);
}

/* Dotted quad, as inet_ntop writes it: this runs for every proxied request (X-Forwarded-For),
 * and glibc's inet_ntop goes through sprintf (~1,700 instructions; this ~60). */
static void format_ipv4(const uint8_t *b, char *out, size_t cap)
{
    char tmp[16], *p = tmp;
    for (int i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (v >= 100)
            *p++ = (char)('0' + v / 100);
        if (v >= 10)
            *p++ = (char)('0' + v / 10 % 10);
        *p++ = (char)('0' + v % 10);
        *p++ = i < 3 ? '.' : 0;
    }
    if ((size_t)(p - tmp) <= cap)
        memcpy(out, tmp, (size_t)(p - tmp));
}

void moat_format_ip(const struct sockaddr *sa, char *out, size_t cap)
{
    out[0] = 0;
    if (sa == NULL)
        return;
    if (sa->sa_family == AF_INET)
        format_ipv4((const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr, out, cap);
    else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        /* A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; logs and
         * X-Forwarded-For show them as the IPv4 addresses they are. */
        if (IN6_IS_ADDR_V4MAPPED(a))
            format_ipv4(a->s6_addr + 12, out, cap);
        else
            inet_ntop(AF_INET6, a, out, (socklen_t)cap);
    }
}

void moat_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}
