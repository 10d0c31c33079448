/* Per-thread reuse of small heap blocks (server/base/mem.c).
 *
 * Every proxied HTTP/2 request allocates and frees some 15 small blocks (nghttp2's stream,
 * header and frame records, moat's stream and exchange state, buffers). With hundreds of
 * streams in flight glibc's per-thread cache (7 blocks per size) runs dry and every call takes
 * the arena's slow path: ~11 % of a worker's instructions in the h2 benchmark. Blocks freed
 * here are kept on per-thread lists by size class (16-byte steps to 1 KiB, then powers of two
 * to 16 KiB), up to a bound, and handed out again without glibc. They are ordinary malloc
 * blocks: free() and moat_mem_free() may each release what the other allocated. Only threads
 * that call moat_mem_thread_enable keep blocks (the workers); elsewhere these are malloc and
 * free. moat_mem_thread_release gives the kept blocks back (a quiet worker, a thread's end).
 * Under AddressSanitizer kept blocks are poisoned whole, so a use after free is still caught. */
#ifndef MOAT_MEM_H
#define MOAT_MEM_H

#include <stddef.h>

void *moat_mem_alloc(size_t n);
void *moat_mem_calloc(size_t n, size_t size);
void *moat_mem_realloc(void *p, size_t n);
void moat_mem_free(void *p);
/* Start keeping blocks on this thread. */
void moat_mem_thread_enable(void);
/* Free every block this thread keeps. */
void moat_mem_thread_release(void);
/* Bytes this thread keeps, for tests. */
size_t moat_mem_thread_kept(void);

#endif
