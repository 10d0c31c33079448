/* Unit tests for the per-thread block reuse (server/base/mem.c). */
#include "moat/mem.h"
#include "test.h"

#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Off until enabled: plain malloc and free, nothing kept. */
static void test_off_by_default(void)
{
    void *p = moat_mem_alloc(100);
    CHECK(p != NULL);
    moat_mem_free(p);
    CHECK_INT(moat_mem_thread_kept(), 0);
}

/* A freed block comes back for a request of its class, holds what is asked, and realloc keeps
 * the contents; calloc zeroes a reused block; release frees everything kept. */
static void test_reuse_and_release(void)
{
    moat_mem_thread_enable();
    char *a = moat_mem_alloc(40);
    memset(a, 'x', 40);
    moat_mem_free(a);
    CHECK(moat_mem_thread_kept() >= 48);
    char *b = moat_mem_alloc(33); /* the 48-byte class */
    CHECK(b == a);
    CHECK(malloc_usable_size(b) >= 33);
    CHECK_INT(moat_mem_thread_kept(), 0);
    memset(b, 'y', 33);
    moat_mem_free(b);
    unsigned char *z = moat_mem_calloc(3, 11);
    int nonzero = 0;
    for (int i = 0; i < 33; i++)
        nonzero += z[i] != 0;
    CHECK_INT(nonzero, 0);
    char *r = moat_mem_realloc(NULL, 1000);
    memset(r, 'r', 1000);
    r = moat_mem_realloc(r, 3000); /* grows into the 4 KiB class, contents kept */
    CHECK(malloc_usable_size(r) >= 3000);
    int same = 1;
    for (int i = 0; i < 1000; i++)
        same &= r[i] == 'r';
    CHECK_INT(same, 1);
    CHECK(moat_mem_realloc(r, 10) == r); /* shrinking keeps the block */
    moat_mem_free(r);
    moat_mem_free(z);
    /* Plain malloc blocks are taken too, and big ones go straight back. */
    moat_mem_free(malloc(200));
    size_t before = moat_mem_thread_kept();
    moat_mem_free(malloc(1 << 20));
    CHECK_INT(moat_mem_thread_kept(), before);
    moat_mem_thread_release();
    CHECK_INT(moat_mem_thread_kept(), 0);
}

/* Bounded: at most 1,024 blocks of a class and 4 MiB in all are kept. */
static void test_bounded(void)
{
    enum { N = 1100 };
    static void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = moat_mem_alloc(64);
    for (int i = 0; i < N; i++)
        moat_mem_free(p[i]);
    CHECK(moat_mem_thread_kept() <= 1024 * 80);
    CHECK(moat_mem_thread_kept() >= 1024 * 64);
    for (int i = 0; i < N; i++)
        p[i] = moat_mem_alloc(8000);
    for (int i = 0; i < N; i++)
        moat_mem_free(p[i]);
    CHECK(moat_mem_thread_kept() <= (4u << 20));
    CHECK(moat_mem_thread_kept() >= (4u << 20) - 16384);
    moat_mem_thread_release();
    CHECK_INT(moat_mem_thread_kept(), 0);
}

int main(void)
{
    test_off_by_default();
    test_reuse_and_release();
    test_bounded();
    return test_summary("mem");
}
