/* Unit tests for the base (server/base/common.c): slices, the growable buffer, error strings
 * and address formatting. Links the base alone. */
#include "moat/common.h"
#include "test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>

static void test_slices(void)
{
    CHECK(moat_slice_eq(moat_slice_str("Host"), "Host"));
    CHECK(!moat_slice_eq(moat_slice_str("Host"), "host"));
    CHECK(moat_slice_ieq(moat_slice_str("Content-LENGTH"), "content-length"));
    CHECK(!moat_slice_ieq(moat_slice_str("content-length"), "content-lengt"));
    CHECK(moat_slices_ieq(moat_slice("", 0), moat_slice(NULL, 0)));
    /* Only ASCII letters fold: '@' (0x40) and '`' (0x60) differ by 32 but are not letters. */
    CHECK(!moat_slice_ieq(moat_slice_str("@"), "`"));
}

/* Appending nothing is a success, whatever the buffer holds, and allocates nothing: an idle
 * connection keeps no buffer, and callers append empty slices (an empty header value, a
 * zero-length body chunk) without checking first. */
static void test_buf_append_empty(void)
{
    moat_buf_t b = {0};
    CHECK_INT(moat_buf_append(&b, NULL, 0), 0);
    CHECK_INT(moat_buf_append(&b, "", 0), 0);
    CHECK_INT(moat_buf_put(&b, moat_slice(NULL, 0)), 0);
    CHECK_INT(moat_buf_puts(&b, ""), 0);
    CHECK_INT(moat_buf_size(&b), 0);
    CHECK(b.base == NULL);
    CHECK_INT(moat_buf_append(&b, "ab", 2), 0);
    CHECK_INT(moat_buf_append(&b, NULL, 0), 0);
    CHECK_INT(moat_buf_size(&b), 2);
    moat_buf_free(&b);
}

/* reserve(0) on an empty buffer still gives a usable write pointer (it means "a place to
 * write at", not failure). */
static void test_buf_reserve_zero(void)
{
    moat_buf_t b = {0};
    CHECK(moat_buf_reserve(&b, 0) != NULL);
    moat_buf_free(&b);
}

static void test_buf_grow_consume(void)
{
    moat_buf_t b = {0};
    char chunk[700];
    memset(chunk, 'x', sizeof chunk);
    for (int i = 0; i < 10; i++)
        CHECK_INT(moat_buf_append(&b, chunk, sizeof chunk), 0);
    CHECK_INT(moat_buf_size(&b), 7000);
    moat_buf_consume(&b, 6990);
    CHECK_INT(moat_buf_size(&b), 10);
    size_t cap = b.cap;
    /* More than the room at the end: the room freed at the front is reused (the live bytes
     * slide down) before the buffer grows. */
    char more[2000];
    memset(more, 'z', sizeof more);
    CHECK(cap - b.len < sizeof more);
    CHECK_INT(moat_buf_append(&b, more, sizeof more), 0);
    CHECK_INT(b.cap, cap);
    CHECK_INT(b.off, 0);
    CHECK_INT(moat_buf_size(&b), 2010);
    CHECK(moat_buf_data(&b)[9] == 'x' && moat_buf_data(&b)[10] == 'z');
    moat_buf_consume(&b, 2010);
    CHECK_INT(moat_buf_size(&b), 0);
    CHECK_INT(b.len, 0);
    moat_buf_reset(&b);
    CHECK_INT(moat_buf_size(&b), 0);
    moat_buf_free(&b);
    CHECK(b.base == NULL && b.cap == 0);
}

static void test_buf_format(void)
{
    moat_buf_t b = {0};
    CHECK_INT(moat_buf_put_u64(&b, 0), 0);
    CHECK_INT(moat_buf_puts(&b, " "), 0);
    CHECK_INT(moat_buf_put_u64(&b, UINT64_MAX), 0);
    CHECK_INT(moat_buf_appendf(&b, " %s=%d", "n", 42), 0);
    CHECK_INT(moat_buf_append(&b, "", 1), 0);
    CHECK_STR(moat_buf_data(&b), "0 18446744073709551615 n=42");
    moat_buf_reset(&b);
    /* Longer than appendf's stack buffer: formatted straight into the buffer. */
    char big[2000];
    memset(big, 'y', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    CHECK_INT(moat_buf_appendf(&b, "<%s>", big), 0);
    CHECK_INT(moat_buf_size(&b), sizeof big + 1);
    CHECK(moat_buf_data(&b)[0] == '<' && moat_buf_data(&b)[sizeof big] == '>');
    moat_buf_free(&b);
}

static void test_strerror(void)
{
    CHECK_STR(moat_strerror(0), "success");
    CHECK_STR(moat_strerror(MOAT_ENOMEM), "out of memory");
    CHECK_STR(moat_strerror(12345), "unknown error");
    char err[8];
    moat_errf(err, sizeof err, "%s", "truncated sentence");
    CHECK_STR(err, "truncat");
    moat_errf(NULL, 0, "ignored");
}

static void test_format_ip(void)
{
    char out[64];
    struct sockaddr_in v4 = {.sin_family = AF_INET};
    inet_pton(AF_INET, "192.0.2.7", &v4.sin_addr);
    moat_format_ip((struct sockaddr *)&v4, out, sizeof out);
    CHECK_STR(out, "192.0.2.7");
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6};
    inet_pton(AF_INET6, "::ffff:198.51.100.1", &v6.sin6_addr);
    moat_format_ip((struct sockaddr *)&v6, out, sizeof out);
    CHECK_STR(out, "198.51.100.1");
    inet_pton(AF_INET6, "2001:db8::1", &v6.sin6_addr);
    moat_format_ip((struct sockaddr *)&v6, out, sizeof out);
    CHECK_STR(out, "2001:db8::1");
    moat_format_ip(NULL, out, sizeof out);
    CHECK_STR(out, "");
    /* The IPv4 formatter against inet_ntop, every octet value in every position. */
    int differ = 0;
    for (unsigned v = 0; v < 256; v++) {
        for (int pos = 0; pos < 4; pos++) {
            uint8_t b[4] = {1, 20, 255, 0};
            b[pos] = (uint8_t)v;
            memcpy(&v4.sin_addr, b, 4);
            char want[INET_ADDRSTRLEN];
            inet_ntop(AF_INET, b, want, sizeof want);
            moat_format_ip((struct sockaddr *)&v4, out, sizeof out);
            differ += strcmp(out, want) != 0;
        }
    }
    CHECK_INT(differ, 0);
    memset(&v4.sin_addr, 255, 4);
    moat_format_ip((struct sockaddr *)&v4, out, 15); /* "255.255.255.255" needs 16 */
    CHECK_STR(out, "");
}

static void test_xalloc(void)
{
    char *s = moat_xstrndup("abcdef", 3);
    CHECK_STR(s, "abc");
    free(s);
    void *p = moat_xmalloc(0); /* never NULL, even for 0 bytes */
    CHECK(p != NULL);
    free(p);
}

/* The wipe itself, on memory that stays live (reading freed memory would be undefined). */
static void test_secret_wipe(void)
{
    char key[] = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n";
    size_t n = sizeof key;
    moat_secret_wipe(key, n - 1);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++)
        nonzero += key[i] != 0;
    CHECK_INT(nonzero, 0);
    moat_secret_wipe(NULL, 10);
    moat_secret_wipe(key, 0);
    moat_secret_free(NULL);
    moat_secret_free(moat_xstrdup("hmac-key")); /* ASan: no leak, no overflow */
    moat_secret_free(moat_xstrdup(""));
}

int main(void)
{
    test_slices();
    test_buf_append_empty();
    test_buf_reserve_zero();
    test_buf_grow_consume();
    test_buf_format();
    test_strerror();
    test_format_ip();
    test_xalloc();
    test_secret_wipe();
    return test_summary("common_test");
}
