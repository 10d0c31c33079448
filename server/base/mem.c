/* Per-thread reuse of small heap blocks (include/moat/mem.h). */
#include "moat/mem.h"

#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define MEM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MEM_ASAN 1
#endif
#endif
#ifdef MEM_ASAN
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(p, n)   ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

/* Classes: 16, 32, ... 1,024 bytes, then 2, 4, 8 and 16 KiB (moat_buf grows by doubling from
 * 1 KiB). A block is kept in the largest class it can serve, and only if it wastes less than
 * half of itself there. */
#define STEP        16
#define SMALL_MAX   1024
#define NSMALL      (SMALL_MAX / STEP)
#define NCLASS      (NSMALL + 4)
#define CLASS_KEEP  1024       /* blocks per class */
#define THREAD_KEEP (4u << 20) /* bytes per thread: the churn of a busy worker fits */

typedef struct block {
    struct block *next;
} block_t;

static _Thread_local struct {
    block_t *head[NCLASS];
    uint16_t count[NCLASS];
    size_t bytes;
    int on;
} kept;

static size_t class_size(int c)
{
    return c < NSMALL ? (size_t)(c + 1) * STEP : (size_t)SMALL_MAX << (c - NSMALL + 1);
}

/* The smallest class whose blocks hold n bytes, or -1. */
static int class_for_alloc(size_t n)
{
    if (n <= SMALL_MAX)
        return n == 0 ? 0 : (int)((n - 1) / STEP);
    for (int c = NSMALL; c < NCLASS; c++)
        if (class_size(c) >= n)
            return c;
    return -1;
}

/* The largest class a block of usable size u serves, or -1. */
static int class_for_block(size_t u)
{
    if (u < STEP || u >= 2 * class_size(NCLASS - 1))
        return -1;
    if (u < 2 * SMALL_MAX)
        return u >= SMALL_MAX ? NSMALL - 1 : (int)(u / STEP) - 1;
    int c = NCLASS - 1;
    while (class_size(c) > u)
        c--;
    return c;
}

void moat_mem_thread_enable(void)
{
    kept.on = 1;
}

void *moat_mem_alloc(size_t n)
{
    int c = kept.on ? class_for_alloc(n) : -1;
    if (c < 0)
        return malloc(n);
    block_t *b = kept.head[c];
    if (b == NULL)
        return malloc(class_size(c));
    size_t u = malloc_usable_size(b);
    ASAN_UNPOISON_MEMORY_REGION(b, u);
    kept.head[c] = b->next;
    kept.count[c]--;
    kept.bytes -= u;
    return b;
}

void *moat_mem_calloc(size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = moat_mem_alloc(n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

void moat_mem_free(void *p)
{
    if (p == NULL)
        return;
    if (!kept.on) {
        free(p);
        return;
    }
    size_t u = malloc_usable_size(p);
    int c = class_for_block(u);
    if (c < 0 || kept.count[c] >= CLASS_KEEP || kept.bytes + u > THREAD_KEEP) {
        free(p);
        return;
    }
    block_t *b = p;
    b->next = kept.head[c];
    kept.head[c] = b;
    kept.count[c]++;
    kept.bytes += u;
    /* All of it, the link too: the list is read with the block unpoisoned first. */
    ASAN_POISON_MEMORY_REGION(p, u);
}

void *moat_mem_realloc(void *p, size_t n)
{
    if (p == NULL)
        return moat_mem_alloc(n);
    if (!kept.on || n == 0)
        return realloc(p, n);
    size_t u = malloc_usable_size(p);
    if (n <= u)
        return p;
    void *q = moat_mem_alloc(n);
    if (q == NULL)
        return NULL;
    memcpy(q, p, u);
    moat_mem_free(p);
    return q;
}

void moat_mem_thread_release(void)
{
    for (int c = 0; c < NCLASS; c++) {
        while (kept.head[c] != NULL) {
            block_t *b = kept.head[c];
            ASAN_UNPOISON_MEMORY_REGION(b, malloc_usable_size(b));
            kept.head[c] = b->next;
            free(b);
        }
        kept.count[c] = 0;
    }
    kept.bytes = 0;
}

size_t moat_mem_thread_kept(void)
{
    return kept.bytes;
}
