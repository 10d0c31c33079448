/* Upstream names followed on the control thread (server/resolver.c).
 *
 * A container that is recreated comes back at a new address under the same name. moat looks
 * every upstream host name up again at the site's resolve_interval= and soon after a worker
 * failed to connect to it, and publishes a re-addressed runtime when an answer changed. The
 * last good answer is kept while lookups fail.
 *
 * Why the control thread and not each worker: one lookup per name serves every worker, a
 * change is logged once by construction, and the workers keep sharing nothing mutable: they
 * receive the new addresses as one more immutable snapshot, exactly like a reload. The cost
 * is one uv_async hop each way plus one uv_getaddrinfo (a thread-pool job; no loop blocks),
 * milliseconds in all, far inside the 2 s a moved app may take to be served again. */
#ifndef MOAT_RESOLVER_H
#define MOAT_RESOLVER_H

#include "snapshot.h"

#include <uv.h>

typedef struct moat_resolver moat_resolver_t;

/* Start following the names of the snapshot manager's current runtime, on loop (the control
 * loop). Only one resolver exists at a time: it is the one moat_resolver_kick reaches. */
moat_resolver_t *moat_resolver_new(uv_loop_t *loop, moat_snapmgr_t *snap);
/* The current runtime changed (a reload): follow its names, on its intervals. */
void moat_resolver_update(moat_resolver_t *r);
/* Stop: cancel lookups, close handles, and run the loop until they are gone. NULL is fine. */
void moat_resolver_free(moat_resolver_t *r);

/* Any thread: a connect to a named upstream failed, so look the names up again soon (at most
 * every MOAT_RESOLVE_KICK_GAP_MS; kicks in between are merged). Does nothing when no
 * resolver runs. */
void moat_resolver_kick(void);

#define MOAT_RESOLVE_KICK_GAP_MS 200

#endif
