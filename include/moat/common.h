/* Small value types and helpers every module uses: slices, growable buffers, error codes,
 * allocation wrappers. */
#ifndef MOAT_COMMON_H
#define MOAT_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MOAT_VERSION "0.1.0"

/* A borrowed byte range; not NUL-terminated. Same layout as uv_buf_t so a slice array can
 * be handed to writev/uv_write without conversion. */
typedef struct {
    char *base;
    size_t len;
} moat_slice_t;

#define MOAT_SLICE_LIT(s) ((moat_slice_t){(char *)(s), sizeof(s) - 1})

static inline moat_slice_t moat_slice(const void *p, size_t len)
{
    return (moat_slice_t){(char *)p, len};
}

static inline moat_slice_t moat_slice_str(const char *s)
{
    return (moat_slice_t){(char *)s, strlen(s)};
}

/* Case-insensitive (ASCII) equality of two slices, and of a slice and a NUL-terminated
 * literal. The literal forms are inline: header names are matched against literals dozens of
 * times per request, and with the literal's length known at compile time most comparisons end
 * at the length check. */
int moat_slices_ieq(moat_slice_t a, moat_slice_t b);
static inline int moat_slice_ieq(moat_slice_t a, const char *lit)
{
    size_t n = strlen(lit);
    return a.len == n && moat_slices_ieq(a, moat_slice(lit, n));
}
static inline int moat_slice_eq(moat_slice_t a, const char *lit)
{
    size_t n = strlen(lit);
    return a.len == n && memcmp(a.base, lit, n) == 0;
}

/* A growable owned buffer: bytes [off, len) are the live content. reserve/commit append,
 * consume drops from the front. Memory is released by moat_buf_free only. */
typedef struct {
    char *base;
    size_t off;
    size_t len;
    size_t cap;
} moat_buf_t;

/* Make room for at least n more bytes after len; returns the write pointer or NULL when the
 * allocation fails (the caller fails only its own connection). */
char *moat_buf_reserve(moat_buf_t *b, size_t n);
static inline void moat_buf_commit(moat_buf_t *b, size_t n)
{
    b->len += n;
}
int moat__buf_append_slow(moat_buf_t *b, const void *p, size_t n);
/* Append n bytes (0 or MOAT_ENOMEM). Inline when they fit: ~40 appends per proxied request. */
static inline int moat_buf_append(moat_buf_t *b, const void *p, size_t n)
{
    if (n != 0 && b->base != NULL && b->cap - b->len >= n) {
        memcpy(b->base + b->len, p, n);
        b->len += n;
        return 0;
    }
    return moat__buf_append_slow(b, p, n);
}
int moat_buf_appendf(moat_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Append a slice, a NUL-terminated string, or a decimal number (no printf on hot paths). */
static inline int moat_buf_put(moat_buf_t *b, moat_slice_t s)
{
    return moat_buf_append(b, s.base, s.len);
}
static inline int moat_buf_puts(moat_buf_t *b, const char *s)
{
    return moat_buf_append(b, s, strlen(s));
}
int moat_buf_put_u64(moat_buf_t *b, uint64_t v);
static inline size_t moat_buf_size(const moat_buf_t *b)
{
    return b->len - b->off;
}
static inline char *moat_buf_data(const moat_buf_t *b)
{
    return b->base + b->off;
}
void moat_buf_consume(moat_buf_t *b, size_t n);
void moat_buf_reset(moat_buf_t *b);
void moat_buf_free(moat_buf_t *b);

/* Error codes: 0 is success, every failure a negative code from this table. */
#define MOAT_ERRNO_MAP(X)                                                                          \
    X(NOMEM, "out of memory")                                                                      \
    X(INVAL, "invalid argument")                                                                   \
    X(IO, "input/output error")                                                                    \
    X(AGAIN, "try again")                                                                          \
    X(NEED_MORE, "need more data")                                                                 \
    X(PARSE, "parse error")                                                                        \
    X(TOO_LARGE, "too large")                                                                      \
    X(NOT_FOUND, "not found")                                                                      \
    X(EXISTS, "already exists")                                                                    \
    X(PERM, "permission denied")                                                                   \
    X(TLS, "TLS error")                                                                            \
    X(CRYPTO, "cryptographic error")                                                               \
    X(STORAGE, "storage error")                                                                    \
    X(SCHEMA, "database schema is newer than this moat")                                           \
    X(CLOSED, "connection closed")                                                                 \
    X(TIMEOUT, "timed out")                                                                        \
    X(UPSTREAM, "upstream error")

enum {
    MOAT_OK = 0,
    MOAT__ERR_BASE = -1000,
#define MOAT_ERR_ENUM(name, msg) MOAT_E##name,
    MOAT_ERRNO_MAP(MOAT_ERR_ENUM)
#undef MOAT_ERR_ENUM
};

const char *moat_strerror(int err);

/* Write a sentence into a caller's error buffer (err may be NULL). */
void moat_errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

struct sockaddr;
/* The address of an IPv4/IPv6 peer as text ("" for other families). */
void moat_format_ip(const struct sockaddr *sa, char *out, size_t cap);

/* Control-plane allocation: aborts with a message when memory is exhausted. */
void *moat_xmalloc(size_t n);
void *moat_xcalloc(size_t n, size_t m);
void *moat_xrealloc(void *p, size_t n);
char *moat_xstrdup(const char *s);
char *moat_xstrndup(const char *s, size_t n);

/* Secrets (private keys as PEM, EAB HMAC keys). A memset right before free() is a dead store
 * the compiler may drop; these wipe in a way it may not (explicit_bzero: the base needs no
 * BoringSSL for it). moat_secret_free wipes a NUL-terminated secret and frees it; NULL is
 * fine. */
void moat_secret_wipe(void *p, size_t n);
void moat_secret_free(char *s);

#define MOAT_ARRAY_LEN(a)                    (sizeof(a) / sizeof((a)[0]))
#define MOAT_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#define MOAT_MIN(a, b)                       ((a) < (b) ? (a) : (b))
#define MOAT_MAX(a, b)                       ((a) > (b) ? (a) : (b))

#endif
